# syntax=docker/dockerfile:1.7
#
# MLflow tracking server for deploy/k8s: PostgreSQL backend store, S3/MinIO artifacts, MLflow's
# basic auth (--app-name basic-auth), and the operator's bootstrap step (the Job
# mlflow-bootstrap). Build from the deploy/ folder:
#
#   docker build -f deploy/mlflow.Dockerfile -t REGISTRY/forgedit-mlflow:3.17.2 deploy
#
# The requirement set is deploy/mlflow/requirements.txt, the same file scripts/setup.sh installs
# for the local fleet (scripts/fleet.sh): mlflow[auth] (without the extra, basic auth exits at
# start-up with an ImportError), psycopg 3 (SQLAlchemy's driver for postgresql:// URLs) and boto3.
FROM python:3.11.11-slim-bookworm
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 PYTHONUNBUFFERED=1
COPY mlflow/requirements.txt /opt/forgedit-mlflow/requirements.txt
RUN pip install -r /opt/forgedit-mlflow/requirements.txt \
    && groupadd --system --gid 10001 mlflow \
    && useradd --system --uid 10001 --gid mlflow --home-dir /tmp mlflow
COPY mlflow/bootstrap.py /opt/forgedit-mlflow/bootstrap.py
USER 10001:10001
EXPOSE 5000
ENTRYPOINT ["mlflow"]
CMD ["server", "--host=0.0.0.0", "--port=5000"]
