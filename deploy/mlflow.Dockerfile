# syntax=docker/dockerfile:1.7
#
# MLflow tracking server for deploy/k8s (PostgreSQL backend store, S3/MinIO artifacts). The
# upstream image lacks the PostgreSQL driver and boto3, hence this small image:
#
#   docker build -f deploy/mlflow.Dockerfile -t REGISTRY/forgedit-mlflow:3.17.2 deploy
#
# mlflow is pinned to the version the registry is developed against (3.18.0 does not resolve).
FROM python:3.11.11-slim-bookworm
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 PYTHONUNBUFFERED=1
RUN pip install mlflow==3.17.2 psycopg2-binary==2.9.13 boto3==1.44.5 \
    && groupadd --system --gid 10001 mlflow \
    && useradd --system --uid 10001 --gid mlflow --home-dir /tmp mlflow
USER 10001:10001
EXPOSE 5000
ENTRYPOINT ["mlflow"]
CMD ["server", "--host=0.0.0.0", "--port=5000"]
