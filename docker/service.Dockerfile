# The cylon-store shuffle service (`cylon-store serve`, Arrow Flight) as a container, for ECS/Fargate
# or EC2 next to the Lambda functions that use it as flight://ADDRESS:8815. Build from the
# repository's root:
#
#   docker build -f docker/service.Dockerfile -t cylon-store-service .
#   docker run -p 8815:8815 -e CYLON_STORE_TOKEN=... -v /mnt/efs/spill:/spill \
#       cylon-store-service --memory-limit 8GiB --spill-dir /spill
#
# The token comes from the environment (on ECS: a secret from Secrets Manager or SSM), never from
# the command line. Give --memory-limit ~75% of the task's memory; --spill-dir on the task's
# ephemeral storage (Fargate: up to 200 GiB) or an EFS mount. TLS: mount a certificate and add
# --tls-cert /certs/cert.pem --tls-key /certs/key.pem (clients use flight+tls://).
FROM python:3.11-slim

COPY . /tmp/cylon-store/src
RUN pip install --no-cache-dir /tmp/cylon-store/src && rm -rf /tmp/cylon-store \
 && useradd --system --uid 10001 cylon && mkdir /spill && chown cylon /spill
USER cylon
EXPOSE 8815
# SIGTERM (docker stop, ECS task stop) lets calls in flight finish before the service exits.
STOPSIGNAL SIGTERM
ENTRYPOINT ["cylon-store", "serve", "--host", "0.0.0.0", "--port", "8815"]
CMD ["--memory-limit", "2GiB", "--spill-dir", "/spill"]
