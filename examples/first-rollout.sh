#!/bin/sh
# The README's walk-through in one go, from nothing to a first rollout on two
# machines: a server, two agents that trust a release key, an image built,
# signed and pushed, `set-image` on one machine, then a staged rollout of the
# next version with an approval gate. The test suite runs it
# (tests/tests/first_hour.rs), so the README's commands stay true.
#
#   examples/first-rollout.sh DIR     # binaries on PATH; DIR must not exist
#
# Everything lives in DIR (flottectl's named profiles too, through
# XDG_CONFIG_HOME); the server and agents it starts are stopped at exit.
set -eu

dir=${1:?usage: first-rollout.sh DIR}
mkdir "$dir"
dir=$(cd "$dir" && pwd)
export XDG_CONFIG_HOME="$dir/config"
unset FLOTTE_PROFILE FLOTTE_SERVER
pids=""
trap 'for pid in $pids; do kill "$pid" 2>/dev/null || true; done; wait' EXIT

# Waits up to 60 s for a command to succeed (polling what it observes).
eventually() {
    tries=0
    until "$@" >/dev/null 2>&1; do
        tries=$((tries + 1))
        if [ "$tries" -ge 120 ]; then
            echo "first-rollout: gave up waiting for: $*" >&2
            return 1
        fi
        sleep 0.5
    done
}

step() { printf '\n== %s\n' "$*"; }

step "a server, and its admin profile as the current one"
flotte-server init --data-dir "$dir/server" >/dev/null
# A free port (the README uses the default, 127.0.0.1:7443): the server
# writes the address it listens on into its data dir.
flotte-server run --data-dir "$dir/server" --listen 127.0.0.1:0 >"$dir/server.log" 2>&1 &
pids="$pids $!"
eventually grep -q . "$dir/server/server.address"
FLOTTE_SERVER=$(cat "$dir/server/server.address")
export FLOTTE_SERVER
flottectl profile import "$dir/server/admin" --name local
eventually flottectl version

step "a release key: the server and the agents trust its public half"
flottectl image keygen --out "$dir/keys"
flottectl image trust add "$dir/keys/release.pub" --name release
cat >"$dir/agent.toml" <<EOF
[images]
release_keys = ["$dir/keys/release.pub"]
EOF

step "two machines: web-1 for qualification, web-2 in production"
for machine in web-1:env=qa web-2:env=prod; do
    name=${machine%%:*}
    labels=role=web,${machine#*:}
    token=$(flottectl token create --labels "$labels" --zone dc1 --ttl 10m 2>/dev/null)
    flotte-agent run --config "$dir/agent.toml" --data-dir "$dir/$name" \
        --server "$FLOTTE_SERVER" --join "$token" --hostname "$name" \
        >"$dir/$name.log" 2>&1 &
    pids="$pids $!"
done
eventually flottectl machines show web-1
eventually flottectl machines show web-2
flottectl machines list

step "an image: a directory, signed, pushed"
for version in 1.0.0 1.1.0; do
    mkdir -p "$dir/app-$version/bin"
    printf '%s\n' "$version" >"$dir/app-$version/VERSION"
    cat >"$dir/app-$version/bin/app" <<'EOF'
#!/bin/sh
# A stand-in service: says which version it is, then idles.
echo "app $(cat "$(dirname "$0")/../VERSION") started"
exec sleep infinity
EOF
    chmod 0755 "$dir/app-$version/bin/app"
    flottectl image build "$dir/app-$version" --name app --version "$version" \
        --key "$dir/keys/release.key" --service bin/app --out "$dir/app-$version.flotte"
    flottectl image push "$dir/app-$version.flotte"
done

step "set-image: both machines run app@1.0.0"
flottectl machines set-image web-1 app@1.0.0
flottectl machines set-image web-2 app@1.0.0
runs() { flottectl machines show "$1" | grep -q "^  current  *$2"; }
eventually runs web-1 app@1.0.0
eventually runs web-2 app@1.0.0

step "a staged rollout of app@1.1.0: qualification, approval, production"
cat >"$dir/plan.toml" <<'EOF'
[[stage]]
name = "qualification"
selector = "env=qa"
bake = "5s"
approval = true

[[stage]]
name = "production"
selector = "env=prod"
batch = 1

[policy]
max_failures = 1
machine_deadline = "2m"
on_failure = "rollback"
EOF
flottectl rollout create --image app@1.1.0 --plan "$dir/plan.toml" --dry-run
id=$(flottectl rollout create --image app@1.1.0 --plan "$dir/plan.toml" -o json |
    sed -n 's/^  "id": "\([0-9a-f-]*\)",$/\1/p')
waiting() { flottectl rollout show "$id" | grep -q "approval of stage qualification"; }
eventually waiting
flottectl rollout approve "$id"
flottectl rollout watch "$id"
flottectl machines list -o wide
