"""What to forget: a class, a subgroup inside a class, or image-text associations.

Kept free of torch so that request validation (and ``erasure schema``) stays fast.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

TargetKind = Literal["class", "subgroup", "association"]


class ForgetTarget(BaseModel):
    """What to forget.

    - ``class``: ``class_name`` (e.g. "circle").
    - ``subgroup``: ``class_name`` + ``attribute``/``value`` (e.g. colour = red: "red circle").
    - ``association``: the image-text pairs in the forget data; ``captions`` optionally names the
      texts whose association is erased (e.g. all captions mentioning "red").
    """

    model_config = ConfigDict(extra="forbid")

    kind: TargetKind
    class_name: str | None = None
    attribute: str | None = None
    value: str | None = None
    captions: list[str] = Field(default_factory=list)

    @model_validator(mode="after")
    def _complete(self) -> "ForgetTarget":
        if self.kind in ("class", "subgroup") and not self.class_name:
            raise ValueError(f"target.class_name is required for a {self.kind} target (e.g. 'circle')")
        if self.kind == "subgroup" and not (self.attribute and self.value):
            raise ValueError("target.attribute and target.value are required for a subgroup (e.g. attribute='colour', value='red')")
        return self

    @property
    def name(self) -> str:
        """The class name this target is known by in zero-shot prompts ("circle", "red circle")."""
        if self.kind == "subgroup":
            return f"{self.value} {self.class_name}"
        if self.kind == "class":
            return str(self.class_name)
        return "association:" + ("|".join(self.captions[:3]) if self.captions else "pairs")

    def matches(self, record) -> bool:
        """Does a manifest record belong to this target (class/subgroup only)?"""
        if self.kind == "class":
            return record.label == self.class_name
        if self.kind == "subgroup":
            return record.label == self.class_name and str(record.attributes.get(self.attribute)) == self.value
        return bool(self.captions) and record.caption in self.captions
