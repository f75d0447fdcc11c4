#!/bin/sh
# Turn examples/libvirt-mdev.conf into the packaged /etc/libvirt/libvirt-mdev.conf: every
# setting commented out, so a fresh install runs on the built-in defaults (the example's
# proxy_listen and log_file are examples, not defaults) and the admin uncomments what
# they change.  Usage: sh debian/mkconf.sh examples/libvirt-mdev.conf > OUT
set -eu
cat <<'HEAD'
# /etc/libvirt/libvirt-mdev.conf -- see libvirt-mdev.conf(5).
# Installed by the libvirt-mdev package; every setting below is commented out and the
# built-in defaults apply.  Uncomment a line to change it.  Put comments on lines of
# their own (not after a value).  The hook reads this file on every call: no restart.
#
HEAD
sed -e '1{/^# \/etc\/libvirt\/libvirt-mdev.conf/d}' -e 's/^\([a-z_][a-z_]*[ ]*=\)/# \1/' "$1"
