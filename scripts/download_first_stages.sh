#!/bin/bash
# The original's download_first_stages.sh: the published autoencoders into models/first_stage_models/<name>/, unzipped.
exec "${PYTHON:-python3}" "$(dirname "$0")/download_models.py" --group first_stages "$@"
