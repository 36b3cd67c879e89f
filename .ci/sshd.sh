#!/usr/bin/env bash
# A private sshd on 127.0.0.1 only (never another address), for the `core.ssh` transport tests of
# tests/aiida/test_slurm.py.  Idempotent: installs openssh if missing, makes a key without passphrase once,
# authorises it for this user (one line, tagged), starts the daemon only if its PID file names a live process,
# then checks that the key logs in.  Stop it (and remove the key line) with:  bash .ci/sshd.sh stop
#
#   port     AIIDA_DM21_SSHD_PORT (2222)
#   state    AIIDA_DM21_SSHD_DIR (/var/lib/aiida-dm21-sshd): id_ed25519[.pub] (the client key), host keys,
#            sshd.pid, sshd.log
# (see /work/shared/notes/ssh-localhost.md, docs/hpc.md)
set -euo pipefail

PORT=${AIIDA_DM21_SSHD_PORT:-2222}
DIR=${AIIDA_DM21_SSHD_DIR:-/var/lib/aiida-dm21-sshd}
KEY=$DIR/id_ed25519
PIDFILE=$DIR/sshd.pid
TAG=aiida-dm21-ci-sshd
AUTH=$HOME/.ssh/authorized_keys
log() { echo "sshd.sh: $*"; }
alive() { [ -s "$PIDFILE" ] && kill -0 "$(cat "$PIDFILE")" 2>/dev/null; }

if [ "${1:-start}" = stop ]; then
    if alive; then log "stopping pid $(cat "$PIDFILE")"; kill "$(cat "$PIDFILE")"; fi
    rm -f "$PIDFILE"
    if [ -f "$AUTH" ]; then sed -i "/ $TAG\$/d" "$AUTH"; fi
    exit 0
fi

if ! [ -x /usr/sbin/sshd ] || ! command -v ssh >/dev/null || ! command -v ssh-keygen >/dev/null; then
    log 'installing openssh-server openssh-client'
    apt-get update -qq
    # no service may start from the package scripts (an sshd on every address, say): we start our own
    no_start=0; [ -e /usr/sbin/policy-rc.d ] || { printf '#!/bin/sh\nexit 101\n' >/usr/sbin/policy-rc.d; chmod +x /usr/sbin/policy-rc.d; no_start=1; }
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends openssh-server openssh-client >/dev/null
    [ "$no_start" = 0 ] || rm -f /usr/sbin/policy-rc.d
fi

mkdir -p "$DIR" /run/sshd "$HOME/.ssh"
chmod 0700 "$DIR" "$HOME/.ssh"
[ -s "$KEY" ] || { log "creating the client key $KEY"; ssh-keygen -q -t ed25519 -N '' -C "$TAG" -f "$KEY"; }
[ -s "$DIR/ssh_host_ed25519_key" ] || ssh-keygen -q -t ed25519 -N '' -f "$DIR/ssh_host_ed25519_key"
touch "$AUTH"
chmod 0600 "$AUTH"
pub=$(cut -d' ' -f1,2 "$KEY.pub")
if ! grep -qF "$pub" "$AUTH"; then
    sed -i "/ $TAG\$/d" "$AUTH"  # an older key of ours
    echo "$pub $TAG" >>"$AUTH"
    log "authorised $KEY.pub in $AUTH"
fi

if alive; then
    log "sshd running (pid $(cat "$PIDFILE"), 127.0.0.1:$PORT)"
else
    log "starting sshd on 127.0.0.1:$PORT"
    rm -f "$PIDFILE"
    # -f /dev/null: none of the system's sshd_config; everything it needs is given here
    /usr/sbin/sshd -f /dev/null -p "$PORT" -h "$DIR/ssh_host_ed25519_key" \
        -o ListenAddress=127.0.0.1 -o PidFile="$PIDFILE" -o PermitRootLogin=prohibit-password \
        -o PasswordAuthentication=no -o KbdInteractiveAuthentication=no -o PubkeyAuthentication=yes \
        -o AuthorizedKeysFile=.ssh/authorized_keys -o UsePAM=no -o Subsystem="sftp internal-sftp" \
        -E "$DIR/sshd.log"
    for _ in $(seq 20); do alive && break; sleep 0.25; done
fi

ssh -p "$PORT" -i "$KEY" -o BatchMode=yes -o IdentitiesOnly=yes -o StrictHostKeyChecking=no \
    -o UserKnownHostsFile=/dev/null -o LogLevel=ERROR "$(id -un)@127.0.0.1" true \
    || { log "the key does not log in; see $DIR/sshd.log"; exit 1; }
log "sshd up: $(id -un)@127.0.0.1:$PORT, key $KEY"
