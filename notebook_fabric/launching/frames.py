"""Where notebook-fabric's own frames are, for both sides: which lines of a stack or traceback are ours."""
from __future__ import annotations

import os

#: the launching package (the rank side included): frames here are the launcher's, not the user's
LAUNCH_DIR = os.path.dirname(os.path.abspath(__file__))
#: the whole notebook_fabric package
PACKAGE_DIR = os.path.dirname(LAUNCH_DIR)


def innermost_user_frame(traceback_text: str) -> str:
    """The deepest ``File ..., line N, in f`` line of ``traceback_text`` outside the standard
    library, site-packages and notebook-fabric itself (else the deepest line)."""
    import sysconfig

    paths = sysconfig.get_paths()
    library = tuple({paths["stdlib"], paths["purelib"], paths["platlib"], PACKAGE_DIR})
    frames = [line.strip() for line in traceback_text.splitlines() if line.strip().startswith('File "')]
    for frame in reversed(frames):
        if not frame[len('File "'):].startswith(library):
            return frame
    return frames[-1] if frames else ""
