# scripts/apt.sh: sourced by scripts/test and scripts/bench (not run on its
# own).  aptInstall PACKAGE... installs Debian packages without starting any
# service they bring: a policy-rc.d answering 101 ("action forbidden") while
# apt runs keeps the Postfix and Redis daemons from starting, and an existing
# policy-rc.d is put back after.  The caller defines say() for messages.

aptPolicy=/usr/sbin/policy-rc.d
aptPolicyBackup=""   # a copy of the policy-rc.d that was there before
aptPolicyOurs=""     # set while our policy-rc.d is in place

aptRestorePolicy() {
    [ -n "$aptPolicyOurs" ] || return 0
    if [ -n "$aptPolicyBackup" ]; then
        mv -f "$aptPolicyBackup" "$aptPolicy"
    else
        rm -f "$aptPolicy"
    fi
    aptPolicyBackup=""
    aptPolicyOurs=""
}

aptNeedRoot() {
    if [ "$(id -u)" -ne 0 ]; then
        say "missing Debian packages: $*"
        say "install them as root (apt-get install -y $*) or run this script as root"
        exit 1
    fi
}

aptInstall() {
    aptNeedRoot "$@"
    say "installing Debian packages: $*"
    export DEBIAN_FRONTEND=noninteractive
    trap aptRestorePolicy EXIT
    if [ -e "$aptPolicy" ]; then
        aptPolicyBackup=$(mktemp /usr/sbin/.policy-rc.d.XXXXXX)
        cp -p "$aptPolicy" "$aptPolicyBackup"
    fi
    aptPolicyOurs=1
    printf '#!/bin/sh\n# relayd scripts/apt.sh: start no services during apt-get install\nexit 101\n' >"$aptPolicy"
    chmod 755 "$aptPolicy"
    # Postfix: no configuration, so it neither asks nor sets up a mailer.
    printf '%s\n' \
        'postfix postfix/main_mailer_type select No configuration' \
        'postfix postfix/mailname string localhost' | debconf-set-selections
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends "$@" >/dev/null
    aptRestorePolicy
    trap - EXIT
    # Belt and braces: no system Postfix daemon left running.
    if [ -x /usr/sbin/postfix ] && /usr/sbin/postfix status >/dev/null 2>&1; then
        /usr/sbin/postfix stop >/dev/null 2>&1 || true
    fi
}
