"""The outputs folder: one object names every place sdlora writes (like `RunFolder`, one level up).

outputs/
  runs/NAME-YYYYmmdd-HHMMSS/     one training run (config, events, samples, checkpoints)
  adapters/NAME.safetensors      finished adapters, by name
  images/                        generated images
  uploads/                       what the app received, one stamped folder per upload
  .upload-cache/                 the app's web server's own copies of uploads, until they are staged
  class_images/BASE/PROMPT-Npx/  prior-preservation images, reused across runs
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

from sdlora.files import new_stamped_folder, safe_name

DEFAULT_OUTPUTS = Path("outputs")
ADAPTER_SUFFIX = ".safetensors"
STAMP_FORMAT = "%Y%m%d-%H%M%S"
_STAMPED = r"-\d{8}-\d{6}(-\d+)?"


@dataclass(frozen=True)
class Outputs:
    root: Path = DEFAULT_OUTPUTS

    def __post_init__(self) -> None:
        object.__setattr__(self, "root", Path(self.root))

    @property
    def runs(self) -> Path:
        return self.root / "runs"

    @property
    def adapters(self) -> Path:
        return self.root / "adapters"

    @property
    def images(self) -> Path:
        return self.root / "images"

    @property
    def uploads(self) -> Path:
        return self.root / "uploads"

    @property
    def upload_cache(self) -> Path:
        """Where the app's web server (Gradio) receives files before they are staged under uploads/."""
        return self.root / ".upload-cache"

    @property
    def class_images_root(self) -> Path:
        return self.root / "class_images"

    def adapter_file(self, name: str) -> Path:
        """Where the adapter called `name` lives (the name is made file-system safe)."""
        return self.adapters / f"{safe_name(name)}{ADAPTER_SUFFIX}"

    def class_images(self, base: str, class_prompt: str, resolution: int) -> Path:
        """Class images depend on the base, the prompt and the size: one folder per combination."""
        return (
            self.class_images_root / safe_name(Path(base).name) / f"{safe_name(class_prompt)}-{resolution}px"
        )

    def new_run_dir(self, name: str) -> Path:
        """A new, empty runs/NAME-<time> folder."""
        return new_stamped_folder(self.runs, name)

    def new_upload_dir(self, name: str = "upload") -> Path:
        return new_stamped_folder(self.uploads, name)

    def run_dirs(self, name: str | None = None) -> list[Path]:
        """Run folders, newest first; only those of adapter `name` when given."""
        pattern = re.compile(rf"^{re.escape(name)}{_STAMPED}$" if name else rf"^.+{_STAMPED}$")
        if not self.runs.is_dir():
            return []
        found = [p for p in self.runs.iterdir() if p.is_dir() and pattern.match(p.name)]
        return sorted(found, key=lambda p: p.name, reverse=True)

    def image_file(self, suffix: str = "", when: datetime | None = None) -> Path:
        """A time-stamped PNG path under images/ (microseconds keep a batch's files apart)."""
        stamp = (when or datetime.now()).strftime(f"{STAMP_FORMAT}-%f")
        return self.images / f"{stamp}{suffix}.png"
