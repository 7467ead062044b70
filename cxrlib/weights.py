"""The `weights` parameter (none | imagenet | chexnet:PATH | torchxrayvision:NAME[@PATH] | file:PATH), parsed once.

Every module that asks where an initialisation comes from (the model factory, the run's folder name, the book's
words for it, the paper's initialisation arms) reads this small value instead of splitting the string itself.
No torch here: the CLI checks a spec before anything heavy is imported.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from .errors import CXRError

SPECS = ("none", "imagenet", "chexnet:PATH", "torchxrayvision:NAME[@PATH]", "file:PATH")
SCHEMES = tuple(spec.partition(":")[0] for spec in SPECS)
FAMILIES = {"none": "random", "imagenet": "imagenet"}  # every other scheme is a chest-X-ray init


@dataclass(frozen=True)
class Weights:
    """One initialisation: its scheme and the argument after the colon ("" for none and imagenet)."""

    scheme: str
    argument: str = ""

    @classmethod
    def parse(cls, spec: str) -> "Weights":
        """CXRError naming the spec when its scheme is unknown or its argument missing or superfluous."""
        scheme, colon, argument = str(spec).partition(":")
        if scheme not in SCHEMES:
            raise CXRError(f"weights={spec!r}: use one of {', '.join(SPECS)}")
        if scheme in ("none", "imagenet") and colon:
            raise CXRError(f"weights={spec!r}: {scheme} takes nothing after it")
        if scheme not in ("none", "imagenet") and not argument.strip():
            raise CXRError(f"weights={spec!r}: give the file or name after the colon, e.g. {scheme}:PATH")
        return cls(scheme, argument.strip())

    @property
    def path(self) -> Path | None:
        """The weights file: chexnet's and file's argument, torchxrayvision's after "@"; None when there is none."""
        if self.scheme in ("chexnet", "file"):
            return Path(self.argument)
        if self.scheme == "torchxrayvision" and "@" in self.argument:
            return Path(self.argument.split("@", 1)[1])
        return None

    @property
    def name(self) -> str:
        """torchxrayvision's model name (before "@"); "" for the other schemes."""
        return self.argument.split("@", 1)[0] if self.scheme == "torchxrayvision" else ""

    @property
    def family(self) -> str:
        """random | imagenet | chest_xray: the paper's initialisation arms, whatever the checkpoint's source."""
        return FAMILIES.get(self.scheme, "chest_xray")

    @property
    def label(self) -> str:
        """The init in the book's words: "random init", "ImageNet", "chest X-ray (file: <run folder>)"."""
        if self.family != "chest_xray":
            return {"random": "random init", "imagenet": "ImageNet"}[self.family]
        where = self.name or (self.path.parent.name if self.scheme == "file" else self.path.stem) or self.argument
        return f"chest X-ray ({self.scheme}: {where})"

    @property
    def folder_part(self) -> str:
        """The init in a run folder's name: "none", "imagenet", "file-<run folder>" (a model.pt is named by its
        folder), "chexnet-<file stem>", "torchxrayvision-<name>"."""
        if self.scheme in ("none", "imagenet"):
            return self.scheme
        if self.scheme == "torchxrayvision":
            return f"{self.scheme}-{self.name}"
        return f"{self.scheme}-{self.path.parent.name if self.path.stem == 'model' else self.path.stem}"
