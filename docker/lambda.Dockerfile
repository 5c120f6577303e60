# cylon-store ranks on AWS Lambda as a container image, for functions that outgrow the .zip
# (250 MB unzipped with layers; an image may hold 10 GB, so nothing is trimmed here). The base
# image brings the Lambda runtime interface client and boto3.
#
# Rendered from the template in cylon_store/serverless/deploy.py (render_dockerfile): the copy in
# docker/lambda.Dockerfile installs the repository's source tree (build it from the repository's
# root); `cylon-store lambda build --docker` writes one next to the zip that installs the wheel
# it built.
#
#   docker build --platform linux/amd64 -f docker/lambda.Dockerfile -t cylon-store-lambda .
#   (--platform linux/arm64 for arm64), push it to an Amazon ECR repository, then
#   cylon-store lambda deploy --function NAME --role ROLE_ARN --arch x86_64 \
#       --image-uri ACCOUNT.dkr.ecr.REGION.amazonaws.com/cylon-store-lambda:latest
FROM public.ecr.aws/lambda/python:3.11

COPY . /tmp/cylon-store/src
RUN pip install --no-cache-dir --target "${LAMBDA_TASK_ROOT}" "/tmp/cylon-store/src[s3,dynamodb,redis]" \
 && rm -rf /tmp/cylon-store

CMD ["cylon_store.serverless.handler"]
