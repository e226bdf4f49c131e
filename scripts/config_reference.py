"""The binaries' configuration references, as they print them.

Each binary declares every setting once (flowlog-settings) and prints them
all with `--print-config-reference`: section, key, type, default, flag,
environment variable and meaning. scripts/gen-docs.py builds
docs/configuration.md from that, and deploy/check/check_deploy.py checks the
deploy/ config files against it; neither reads Rust source.

Python 3 standard library only.
"""

import json
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

# binary -> (cargo package, extra cargo arguments, where its settings are declared)
BINARIES = {
    "flowlog-sidecar": ("flowlog-sidecar", [], "flowlog-sidecar/src/config.rs"),
    # Without the EC2 source: the same settings, without the long aws-sdk-ec2 build.
    "flowlog-enricher": ("flowlog-enricher", ["--no-default-features"], "enricher/src/config.rs"),
}


class ReferenceError(Exception):
    pass


def reference(binary, executable=None):
    """What `binary --print-config-reference` prints, parsed. Runs
    `executable` when given, else builds and runs the binary with cargo."""
    if executable is not None:
        cmd = [str(executable)]
    else:
        package, extra, _ = BINARIES[binary]
        cmd = ["cargo", "run", "--quiet", "-p", package, *extra, "--bin", binary, "--"]
    cmd.append("--print-config-reference")
    r = subprocess.run(cmd, cwd=ROOT, stdin=subprocess.DEVNULL, capture_output=True, text=True)
    if r.returncode != 0:
        raise ReferenceError(f"`{' '.join(cmd)}` failed ({r.returncode}): {r.stderr.strip()[-3000:]}")
    try:
        ref = json.loads(r.stdout)
    except json.JSONDecodeError as e:
        raise ReferenceError(f"`{' '.join(cmd)}` printed no JSON: {e}")
    if ref.get("binary") != binary:
        raise ReferenceError(f"`{' '.join(cmd)}` printed the reference of {ref.get('binary')!r}")
    return ref
