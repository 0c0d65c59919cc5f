#!/usr/bin/env python3
"""A Flotte integration in Python: list the machines, then preview a rollout.

It talks to the server's gRPC API (flotte.v1, see docs/api.md) the way
flottectl does: mutual TLS with an operator profile (the directory holding
ca.pem, cert.pem, key.pem and profile.toml). The client stubs are generated
from proto/ at each run into a temporary directory, with grpc_tools.protoc,
so they always match the .proto files beside this example and no generated
code is kept.

    python3 flotte_example.py --profile DIR [--server HOST:PORT] \
        --image NAME@VERSION --plan PLAN.toml [--proto-dir DIR]

The rollout is created with dry_run set: the server validates the plan and
assigns stages and waves, and nothing is started or stored. The profile's
operator needs the `operator` role for that (listing needs only `viewer`).
Exit status: 0 on success, 1 when the server refuses a call (its status code
and message are printed), 2 for a bad argument or profile.
"""

import argparse
import importlib
import pathlib
import sys
import tempfile
import tomllib

import grpc
from grpc_tools import protoc

# The .proto files of the repository this example lives in.
DEFAULT_PROTO_DIR = pathlib.Path(__file__).resolve().parents[2] / "proto"
# A call that gets no answer within this long fails (DEADLINE_EXCEEDED)
# instead of hanging the integration.
CALL_TIMEOUT_SECONDS = 30
# Read at most this much of each profile file: they are a few KiB, and a
# wrong path (a log, a disk image) must not be read whole.
PROFILE_FILE_MAX_BYTES = 64 * 1024


class ExampleError(Exception):
    """A problem with the arguments or the profile (exit status 2)."""


def read_profile_file(profile: pathlib.Path, name: str) -> bytes:
    path = profile / name
    try:
        with open(path, "rb") as file:
            data = file.read(PROFILE_FILE_MAX_BYTES + 1)
    except OSError as error:
        raise ExampleError(f"cannot read {path}: {error.strerror}") from error
    if len(data) > PROFILE_FILE_MAX_BYTES:
        raise ExampleError(f"{path} is larger than {PROFILE_FILE_MAX_BYTES} bytes: not a profile file")
    return data


def profile_server(profile: pathlib.Path) -> str:
    """The server address the profile was made for (`server` in profile.toml)."""
    text = read_profile_file(profile, "profile.toml").decode("utf-8", "replace")
    try:
        settings = tomllib.loads(text)
    except tomllib.TOMLDecodeError as error:
        raise ExampleError(f"{profile / 'profile.toml'} is not valid TOML: {error}") from error
    server = settings.get("server")
    if not isinstance(server, str) or not server:
        raise ExampleError(f"{profile / 'profile.toml'} names no server")
    return server


def generate_stubs(proto_dir: pathlib.Path, out_dir: pathlib.Path) -> None:
    """Compiles every flotte/v1/*.proto into Python modules under out_dir."""
    protos = sorted(str(path.relative_to(proto_dir)) for path in (proto_dir / "flotte" / "v1").glob("*.proto"))
    if not protos:
        raise ExampleError(f"no flotte/v1/*.proto under {proto_dir} (pass --proto-dir)")
    status = protoc.main(
        ["grpc_tools.protoc", f"-I{proto_dir}", f"--python_out={out_dir}", f"--grpc_python_out={out_dir}", *protos]
    )
    if status != 0:
        raise ExampleError(f"grpc_tools.protoc failed on {proto_dir} (status {status})")


def secure_channel(profile: pathlib.Path, server: str) -> grpc.Channel:
    """Mutual TLS: trust only the profile's CA, present its certificate."""
    credentials = grpc.ssl_channel_credentials(
        root_certificates=read_profile_file(profile, "ca.pem"),
        private_key=read_profile_file(profile, "key.pem"),
        certificate_chain=read_profile_file(profile, "cert.pem"),
    )
    return grpc.secure_channel(server, credentials)


def print_machines(machines) -> None:
    print(f"machines ({len(machines)}):")
    for machine in sorted(machines, key=lambda machine: machine.hostname):
        labels = ",".join(f"{key}={value}" for key, value in sorted(machine.labels.items()))
        current = machine.image.current
        image = f"{current.name}@{current.version}" if current.name else "-"
        connection = "connected" if machine.connected else "disconnected"
        print(
            f"  {machine.hostname}  state={machine.state or 'unknown'}  {connection}"
            f"  zone={machine.zone or '-'}  labels={labels or '-'}  image={image}"
        )


def print_dry_run(response) -> None:
    rollout = response.rollout
    print(
        f"dry run: {rollout.image} on {rollout.machine_count} machines in "
        f"{rollout.wave_count} waves (dry_run={str(response.dry_run).lower()}; nothing was started)"
    )
    for stage in rollout.stages:
        print(f"  stage {stage.name}: selector={stage.selector or '(all)'} machines={stage.machines} waves={stage.waves}")
    for machine in sorted(rollout.machines, key=lambda machine: (machine.wave, machine.hostname)):
        print(f"  wave {machine.wave}: {machine.hostname} (zone {machine.zone or '-'})")


def run(arguments: argparse.Namespace) -> int:
    profile = pathlib.Path(arguments.profile)
    server = arguments.server or profile_server(profile)
    plan_path = pathlib.Path(arguments.plan)
    try:
        plan_toml = plan_path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as error:
        raise ExampleError(f"cannot read the plan {plan_path}: {error}") from error
    with tempfile.TemporaryDirectory(prefix="flotte-stubs-") as stubs:
        generate_stubs(pathlib.Path(arguments.proto_dir), pathlib.Path(stubs))
        sys.path.insert(0, stubs)
        admin_pb2 = importlib.import_module("flotte.v1.admin_pb2")
        admin_pb2_grpc = importlib.import_module("flotte.v1.admin_pb2_grpc")
        rollouts_pb2 = importlib.import_module("flotte.v1.rollouts_pb2")
        rollouts_pb2_grpc = importlib.import_module("flotte.v1.rollouts_pb2_grpc")
        with secure_channel(profile, server) as channel:
            machines = admin_pb2_grpc.MachinesStub(channel).ListMachines(
                admin_pb2.ListMachinesRequest(), timeout=CALL_TIMEOUT_SECONDS
            )
            print_machines(machines.machines)
            preview = rollouts_pb2_grpc.RolloutsStub(channel).CreateRollout(
                rollouts_pb2.CreateRolloutRequest(image=arguments.image, plan_toml=plan_toml, dry_run=True),
                timeout=CALL_TIMEOUT_SECONDS,
            )
            print_dry_run(preview)
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--profile", required=True, help="operator profile directory (ca.pem, cert.pem, key.pem, profile.toml)")
    parser.add_argument("--server", help="host:port of the server (default: the profile's)")
    parser.add_argument("--image", required=True, help="name@version of a pushed image")
    parser.add_argument("--plan", required=True, help="rollout plan file (TOML), e.g. examples/plan.toml")
    parser.add_argument("--proto-dir", default=str(DEFAULT_PROTO_DIR), help="directory holding flotte/v1/*.proto")
    arguments = parser.parse_args()
    try:
        return run(arguments)
    except ExampleError as error:
        print(f"flotte_example: {error}", file=sys.stderr)
        return 2
    except grpc.RpcError as error:
        # The server's status code and message say what was refused and why
        # (docs/api.md lists the codes); the message is cut to stay readable.
        print(f"flotte_example: the server refused: {error.code().name}: {error.details()[:500]}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
