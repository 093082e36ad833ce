#!/bin/sh
# The dependency layer of the image builds (operator/, api/ and merge_image/Dockerfile): installs into /opt/venv
# the build requirements and the dependencies of the given extras of ./pyproject.toml, not the project itself, so
# a change of the sources keeps this layer. pip gets the `pip_cert` build secret as its CA bundle when mounted.
#     sh pip-install-deps.sh EXTRA...
set -eu
if [ -s /run/secrets/pip_cert ]; then export PIP_CERT=/run/secrets/pip_cert; fi
python3 - "$@" >/tmp/requirements.txt <<'PY'
import sys
import tomllib

with open("pyproject.toml", "rb") as f:
    data = tomllib.load(f)
requirements = data["build-system"]["requires"] + data["project"]["dependencies"]
for extra in sys.argv[1:]:
    requirements += data["project"]["optional-dependencies"][extra]
print("\n".join(requirements))
PY
/opt/venv/bin/pip install -r /tmp/requirements.txt
