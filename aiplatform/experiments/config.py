"""What an online experiment is: its variants, their traffic weights, and who sees which.

Serving asks one question per request, "which variant does this user get?", and it must get
the same answer on every replica, after every restart and without a lookup: ``assign`` hashes
the experiment's salt and the user id (sha256, so the split is uniform and independent of
how user ids look) into [0, 1) and walks the cumulative weights. A user therefore stays in
their variant for as long as the weights stay the same, and when a canary ramps from 5 % to
25 %, the users already in the canary stay there (the canary's slice grows from the same
end). A variant of weight 0 never gets traffic.

Shadow traffic is decided per request (``mirrored``), not per user, with its own hash input,
so the mirrored share does not correlate with the variant split.

Kept free of storage: an ``Experiment`` is a value (validated by pydantic), the store
(``store.py``) keeps its revisions.
"""

import hashlib
import json
import re
from pathlib import Path
from typing import Any, ClassVar, Self

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    PrivateAttr,
    ValidationError,
    field_validator,
    model_validator,
)

from aiplatform.core.errors import UserInputError

_VARIANT_RE = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")
# Experiment and model names end up in Lance filters: the registry's alphabet.
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$")
_ALIAS_RE = _NAME_RE


def unit_hash(text: str) -> float:
    """A uniform number in [0, 1) from ``text``: the top 53 bits of its sha256 (exact in a float)."""
    digest = hashlib.sha256(text.encode("utf-8")).digest()
    return (int.from_bytes(digest[:8], "big") >> 11) / float(1 << 53)


def check_name(kind: str, value: str) -> str:
    """Experiment and model names go into storage filters, so only a safe alphabet is accepted."""
    if not isinstance(value, str) or not _NAME_RE.match(value):
        raise ValueError(f"invalid {kind} {value!r}: use 1-128 letters, digits, '_', '-' or '.', "
                         "starting with a letter or digit")
    return value


def _check_alias(value: str | None) -> str | None:
    if value is not None and not _ALIAS_RE.match(value):
        raise ValueError(f"alias {value!r}: use 1-128 letters, digits, '_', '-' or '.', starting with a "
                         "letter or digit")
    return value


def _one_target(kind: str, name: str, alias: str | None, version: int | None) -> None:
    if (alias is None) == (version is None):
        both = "both" if alias is not None else "neither"
        raise ValueError(f"{kind} {name!r} sets {both} of alias and version: give exactly one "
                         "(alias: champion, or version: 3)")


class _Arm(BaseModel):
    """What a variant and a shadow share: a name and a model version, named directly or
    through an alias (exactly one of the two)."""

    model_config = ConfigDict(extra="forbid")
    _kind: ClassVar[str] = "variant"

    name: str = Field(min_length=1, max_length=64)
    alias: str | None = None
    version: int | None = Field(None, ge=1)

    @field_validator("name")
    @classmethod
    def _name(cls, value: str) -> str:
        if not _VARIANT_RE.match(value):
            raise ValueError(f"{cls._kind} name {value!r}: use 1-64 letters, digits, '_', '.' or '-'")
        return value

    @field_validator("alias")
    @classmethod
    def _alias(cls, value: str | None) -> str | None:
        return _check_alias(value)

    @model_validator(mode="after")
    def _target(self) -> Self:
        _one_target(self._kind, self.name, self.alias, self.version)
        return self

    @property
    def target(self) -> str:
        """How the arm names its model version, for people: ``alias champion`` or ``v3``."""
        return f"alias {self.alias}" if self.alias is not None else f"v{self.version}"


class Variant(_Arm):
    """One arm: a model version, named directly or through an alias, and its traffic weight."""

    weight: float = Field(ge=0, allow_inf_nan=False)


class Shadow(_Arm):
    """A version that gets a copy of a share of requests; its answers are compared, never served."""

    _kind: ClassVar[str] = "shadow"

    name: str = Field("shadow", min_length=1, max_length=64)
    share: float = Field(gt=0, le=1, allow_inf_nan=False)


class Experiment(BaseModel):
    """An experiment on one model: variants sharing its traffic, optionally a shadow.

    ``salt`` (default: the name) decides the split: two experiments with different salts
    split users independently; keeping the salt when weights change keeps users in place.
    """

    model_config = ConfigDict(extra="forbid")

    name: str
    model_name: str = "two_tower"
    salt: str = Field(min_length=1)
    control: str | None = None
    variants: list[Variant] = Field(min_length=1)
    shadow: Shadow | None = None

    _cumulative: list[float] = PrivateAttr(default_factory=list)

    @model_validator(mode="before")
    @classmethod
    def _default_salt(cls, data: Any) -> Any:
        if isinstance(data, dict) and data.get("salt") in (None, "") and isinstance(data.get("name"), str):
            data = {**data, "salt": data["name"]}
        return data

    @field_validator("name")
    @classmethod
    def _name(cls, value: str) -> str:
        return check_name("experiment name", value)

    @field_validator("model_name")
    @classmethod
    def _model_name(cls, value: str) -> str:
        return check_name("model name", value)

    @model_validator(mode="after")
    def _consistent(self) -> "Experiment":
        names = [v.name for v in self.variants]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ValueError(f"variant names must be unique; repeated: {', '.join(dupes)}")
        total = sum(v.weight for v in self.variants)
        if not total > 0:
            raise ValueError("the variants' weights sum to 0: give at least one variant a weight above 0")
        if self.control is not None and self.control not in names:
            raise ValueError(f"control {self.control!r} is not a variant (variants: {', '.join(names)})")
        if self.shadow is not None and self.shadow.name in names:
            raise ValueError(f"shadow name {self.shadow.name!r} is also a variant's name: rename one")
        cumulative, acc = [], 0.0
        for v in self.variants:
            acc += v.weight / total
            cumulative.append(acc)
        self._cumulative = cumulative
        return self

    # ---- who sees what ----------------------------------------------------------------------
    def assign(self, user_id: str) -> Variant:
        """The user's variant: sticky for as long as salt and weights stay the same."""
        u = unit_hash(f"{self.salt}:{user_id}")
        for variant, edge in zip(self.variants, self._cumulative):
            if u < edge and variant.weight > 0:
                return variant
        # Rounding can leave the last edge a hair below 1: the last variant with traffic.
        return next(v for v in reversed(self.variants) if v.weight > 0)

    def mirrored(self, request_id: str) -> bool:
        """Whether this request is also sent to the shadow (a ``shadow.share`` of requests)."""
        if self.shadow is None:
            return False
        return unit_hash(f"{self.salt}:shadow:{request_id}") < self.shadow.share

    @property
    def control_variant(self) -> Variant:
        """The variant others are compared with: ``control``, else the first variant."""
        if self.control is None:
            return self.variants[0]
        return next(v for v in self.variants if v.name == self.control)

    def variant(self, name: str) -> Variant:
        for v in self.variants:
            if v.name == name:
                return v
        raise KeyError(f"experiment {self.name!r} has no variant {name!r} "
                       f"(variants: {', '.join(v.name for v in self.variants)})")

    def shares(self) -> dict[str, float]:
        """Each variant's share of traffic (weights normalised to sum to 1)."""
        total = sum(v.weight for v in self.variants)
        return {v.name: v.weight / total for v in self.variants}

    def with_weights(self, weights: dict[str, float]) -> "Experiment":
        """A copy with the named variants' weights replaced (the others keep theirs).

        Same salt, so users whose variant did not lose traffic stay where they are."""
        names = [v.name for v in self.variants]
        unknown = sorted(set(weights) - set(names))
        if unknown:
            raise UserInputError(f"experiment {self.name!r} has no variant {', '.join(map(repr, unknown))} "
                                 f"(variants: {', '.join(names)})")
        data = self.model_dump()
        for v in data["variants"]:
            if v["name"] in weights:
                v["weight"] = weights[v["name"]]
        try:
            return Experiment.model_validate(data)
        except ValidationError as exc:
            raise UserInputError(describe_validation_error(exc, f"experiment {self.name!r}")) from exc

    def to_json(self) -> str:
        return json.dumps(self.model_dump(mode="json"), sort_keys=True)


def describe_validation_error(exc: ValidationError, what: str) -> str:
    """One sentence per bad field: where it is (``variants.1.weight``), what is wrong, what was given."""
    parts = []
    for err in exc.errors():
        loc = ".".join(str(x) for x in err.get("loc", ()))
        msg = str(err.get("msg", "invalid value")).removeprefix("Value error, ")
        if err.get("type") == "extra_forbidden":
            at = tuple(err.get("loc", ()))
            owner = (Variant if at[:1] == ("variants",) and len(at) == 3
                     else Shadow if at[:1] == ("shadow",) and len(at) == 2 else Experiment)
            msg = "unknown field; valid ones are " + ", ".join(owner.model_fields)
        where = f"field '{loc}'" if loc else "config"
        got = f" (got {err.get('input')!r})" if loc and err.get("type") != "missing" else ""
        parts.append(f"{what} {where}: {msg}{got}")
    return "; ".join(parts)


def load_experiment(source: "str | Path | dict[str, Any]") -> Experiment:
    """An experiment from a YAML or JSON file (or an already parsed mapping).

    Bad input raises ``UserInputError`` naming the file and the field, e.g.
    ``exp.yaml: experiment field 'variants.1.weight': ...``. A file may hold the fields at the top
    level or under an ``experiment:`` key."""
    if isinstance(source, dict):
        data, what = source, "experiment"
    else:
        path = Path(source)
        what = f"{path}: experiment"
        try:
            text = path.read_text()
        except OSError as exc:
            raise UserInputError(f"cannot read the experiment file {path}: {exc.strerror or exc}") from exc
        try:
            data = json.loads(text) if path.suffix.lower() == ".json" else yaml.safe_load(text)
        except (ValueError, yaml.YAMLError) as exc:
            raise UserInputError(f"{path}: not valid {'JSON' if path.suffix.lower() == '.json' else 'YAML'}: "
                                 f"{exc}") from exc
    if isinstance(data, dict) and isinstance(data.get("experiment"), dict) and len(data) == 1:
        data = data["experiment"]
    if not isinstance(data, dict):
        raise UserInputError(f"{what}: expected a mapping with name, variants (and optionally model_name, "
                             f"salt, control, shadow), got {type(data).__name__}")
    try:
        return Experiment.model_validate(data)
    except ValidationError as exc:
        raise UserInputError(describe_validation_error(exc, what)) from exc
