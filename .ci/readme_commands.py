"""Print a shell command block of README.md, by section and position, so CI runs exactly
what a newcomer reads: `python3 .ci/readme_commands.py "Quick start" 2`."""

import re
import sys
from pathlib import Path

section, index = sys.argv[1], int(sys.argv[2])
text = Path(__file__).resolve().parent.parent.joinpath("README.md").read_text()
body = re.split(r"^## ", text, flags=re.M)
matching = [part for part in body if part.startswith(section + "\n")]
if not matching:
    sys.exit(f"README.md has no section '## {section}'")
blocks = re.findall(r"```sh\n(.*?)```", matching[0], flags=re.S)
if len(blocks) < index:
    sys.exit(f"README.md section '{section}' has {len(blocks)} sh blocks, not {index}")
print(blocks[index - 1].strip())
