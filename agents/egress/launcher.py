"""Chromium started with a profile whose preferences keep speculative loads off.

Speculation-rules prefetch and prerender are made by the browser process itself:
they bypass Playwright routing and DevTools overrides, so they would reach a site
without the job's identifying header. Chromium has no switch for them, but its
"preload pages: never" preference (``net.network_prediction_options`` = 2) turns
them off, also in Playwright's browser contexts. Playwright creates the profile
directory itself and refuses ``--user-data-dir``, so the browser is started through
a small launcher that writes the preferences into that directory first.
"""

from __future__ import annotations

import atexit
import json
import os
import shlex
import shutil
import stat
import tempfile
from pathlib import Path

PROFILE_PREFS = {"net": {"network_prediction_options": 2}}  # 2: never preload pages
SEEDING_FAILED = 97  # the launcher's exit status when it could not write the preferences

LAUNCHER = """#!/bin/sh
# Seeds the new Chromium profile with TrafficBuster's preferences and joins the
# --disable-features switches into one, then starts Chromium.
disabled=""
for arg in "$@"; do
  shift
  case "$arg" in
    --user-data-dir=*)
      dir="${{arg#--user-data-dir=}}"
      mkdir -p "$dir/Default" || exit {failed}
      printf '%s' {prefs} > "$dir/Default/Preferences" || exit {failed}
      ;;
    --disable-features=*)
      disabled="${{disabled:+$disabled,}}${{arg#--disable-features=}}"
      continue
      ;;
  esac
  set -- "$@" "$arg"
done
if [ -n "$disabled" ]; then
  set -- "$@" "--disable-features=$disabled"
fi
exec {executable} "$@"
"""


def seeded_launcher(executable: str) -> str:
    """A launcher for ``executable`` that seeds each profile with ``PROFILE_PREFS`` and
    joins the ``--disable-features`` switches it is given.

    Where there is no POSIX shell (Windows) the executable itself is returned."""
    if os.name != "posix":
        return executable
    directory = Path(tempfile.mkdtemp(prefix="tb-chromium-"))
    atexit.register(shutil.rmtree, directory, ignore_errors=True)
    launcher = directory / "chromium"
    launcher.write_text(
        LAUNCHER.format(
            failed=SEEDING_FAILED,
            prefs=shlex.quote(json.dumps(PROFILE_PREFS)),
            executable=shlex.quote(executable),
        )
    )
    launcher.chmod(stat.S_IRWXU)
    return str(launcher)
