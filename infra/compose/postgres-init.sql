-- One PostgreSQL server, one database per service (run once, on the first start of an empty data volume).
-- prefect: the Prefect server's state; mlflow: MLflow's backend store; labelstudio: Label Studio's Django
-- database; flywheel: the flywheel catalog (its alembic migrations run when a flywheel container first opens it).
CREATE DATABASE prefect;
CREATE DATABASE mlflow;
CREATE DATABASE labelstudio;
CREATE DATABASE flywheel;
