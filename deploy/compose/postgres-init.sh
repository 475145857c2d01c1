#!/bin/sh
# One PostgreSQL server for compose, one database and one owner role per service: each service
# is the only owner of its database (ARCHITECTURE.md), even when they share a server.
# Runs once, on an empty data directory (docker-entrypoint-initdb.d).
set -eu
for svc in wallet gifting payout; do
  psql -v ON_ERROR_STOP=1 --username "$POSTGRES_USER" --dbname postgres \
    -v svc="$svc" -v pass="${LIVEGIFTS_DB_PASSWORD:?LIVEGIFTS_DB_PASSWORD is required}" <<'SQL'
CREATE ROLE :"svc" LOGIN PASSWORD :'pass';
CREATE DATABASE :"svc" OWNER :"svc";
REVOKE ALL ON DATABASE :"svc" FROM PUBLIC;
SQL
done
