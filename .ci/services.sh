#!/usr/bin/env bash
# Start PostgreSQL and RabbitMQ if they are not answering (idempotent; the machines usually have them running).
set -u
if ! pg_isready -h 127.0.0.1 -p 5432 -q 2>/dev/null; then
    echo 'starting PostgreSQL'
    pg_ctlcluster --skip-systemctl-redirect "$(ls /etc/postgresql | head -n1)" main start || true
fi
if ! (exec 3<>/dev/tcp/127.0.0.1/5672) 2>/dev/null; then
    echo 'starting RabbitMQ'
    rabbitmq-server -detached || true
    for _ in $(seq 30); do (exec 3<>/dev/tcp/127.0.0.1/5672) 2>/dev/null && break; sleep 1; done
fi
pg_isready -h 127.0.0.1 -p 5432 && echo 'PostgreSQL up' || echo 'PostgreSQL NOT available'
(exec 3<>/dev/tcp/127.0.0.1/5672) 2>/dev/null && echo 'RabbitMQ up' || echo 'RabbitMQ NOT available'
