# Sourced by the benchmark scripts: starts a throwaway PostgreSQL cluster
# (the newest installed server, trust authentication, UTF8 with the C
# locale) listening only on a Unix socket in the temporary folder $dir, and
# stops and removes it on exit. Defines PG (the server's bin folder) and
# as_pg (runs a command as postgres when run as root, since initdb refuses
# root).
PG=$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -n 1)
as_pg() { if [ "$(id -u)" = 0 ]; then runuser -u postgres -- "$@"; else "$@"; fi; }
dir=$(mktemp -d /tmp/ktpg.XXXXXX)
[ "$(id -u)" = 0 ] && chown postgres: "$dir"
trap 'as_pg "$PG/pg_ctl" -D "$dir/data" -m fast -w stop >/dev/null 2>&1 || true; rm -rf "$dir"' EXIT
as_pg "$PG/initdb" -D "$dir/data" -U postgres --auth=trust -E UTF8 --locale=C >/dev/null
as_pg "$PG/pg_ctl" -D "$dir/data" -l "$dir/server.log" -w \
    -o "-c listen_addresses='' -c unix_socket_directories='$dir'" start >/dev/null
