#!/bin/sh
# One database and one owner role per service on the dev PostgreSQL; each role's name and
# password come from that service's Secret (livegifts-<svc>-db), the same Secret the service
# reads. Runs once, on an empty data directory (docker-entrypoint-initdb.d).
set -eu
for svc in WALLET GIFTING PAYOUT; do
  eval user="\${${svc}_DB_USERNAME:?}"
  eval pass="\${${svc}_DB_PASSWORD:?}"
  db=$(echo "$svc" | tr 'A-Z' 'a-z')
  psql -v ON_ERROR_STOP=1 --username "$POSTGRES_USER" --dbname postgres \
    -v user="$user" -v pass="$pass" -v db="$db" <<'SQL'
CREATE ROLE :"user" LOGIN PASSWORD :'pass';
CREATE DATABASE :"db" OWNER :"user";
REVOKE ALL ON DATABASE :"db" FROM PUBLIC;
SQL
done
