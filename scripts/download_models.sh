#!/bin/bash
# The original's download_models.sh: the published LDM archives into models/ldm/<model>/, unzipped.
# Extra names or flags go to scripts/download_models.py (e.g. --root DIR, --force).
exec "${PYTHON:-python3}" "$(dirname "$0")/download_models.py" --group ldm "$@"
