"""Do these parts belong together? The one compatibility check for tokenizers, coarse maps, code
directories and models.

Every part claims some facts: which codebook it was made with (fingerprint and size), which coarse
map (fingerprint and K), the grid and the number of classes. `check_parts` lists every fact on which
two given parts disagree and raises one `MismatchError` with all of them:

    check_parts(tokenizer=vq, coarse_map=cmap, codes=header, stage1=gpt.config, aux=aux.config)
"""

from __future__ import annotations

from ctfgen.utils.errors import MismatchError
from ctfgen.utils.fingerprint import fingerprint_of

FACTS = {  # fact -> how it reads in a message
    "codebook_fingerprint": "codebook fingerprint", "codebook_size": "codebook size",
    "coarse_map_fingerprint": "coarse map fingerprint", "num_coarse": "number of coarse labels (K)",
    "grid_size": "grid size", "image_tokens": "image tokens", "num_classes": "classes",
}
NAMES = {"tokenizer": "tokenizer", "coarse_map": "coarse map", "codes": "codes", "stage1": "stage-1 GPT",
         "aux": "aux model", "baseline": "baseline GPT", "expected": "request"}


def claims(kind: str, part) -> dict:
    """The facts `part` states, by kind: a tokenizer (or its raw codebook weight, or a fingerprint
    string), a CoarseMap, a code header, a stage-1 / aux / baseline model config, or (any other
    kind) a dict of facts as they are."""
    if kind == "tokenizer":
        size = getattr(getattr(part, "config", None), "codebook_size", None)
        if size is None and hasattr(part, "shape"):
            size = int(part.shape[0])
        return {"codebook_fingerprint": fingerprint_of(part), "codebook_size": size}
    if kind == "coarse_map":
        return {"codebook_fingerprint": part.codebook_fingerprint, "codebook_size": part.vocab_size,
                "coarse_map_fingerprint": part.fingerprint, "num_coarse": part.num_coarse}
    if kind == "codes":
        return {"codebook_fingerprint": part.get("tokenizer_fingerprint"), "codebook_size": part.get("codebook_size"),
                "grid_size": part.get("grid_size"), "image_tokens": part.get("image_tokens")}
    if kind in ("stage1", "aux", "baseline"):  # stage 1's vocabulary is the coarse labels, the others' the codebook
        out = {"codebook_fingerprint": part.codebook_fingerprint, "image_tokens": part.image_tokens,
               "num_classes": part.num_classes, "num_coarse" if kind == "stage1" else "codebook_size": part.vocab_size}
        if kind != "baseline":
            out["coarse_map_fingerprint"] = part.coarse_map_fingerprint
        return {**out, "num_coarse": part.num_coarse} if kind == "aux" else out
    return dict(part)


def check_parts(title: str = "these parts do not belong together", hint: str | None = None, **parts) -> None:
    """Raise MismatchError naming every fact on which the given parts disagree (None: not given)."""
    said = {kind: claims(kind, part) for kind, part in parts.items() if part is not None}
    problems = []
    for fact, label in FACTS.items():
        values = [(NAMES.get(kind, kind), c[fact]) for kind, c in said.items() if c.get(fact) is not None]
        for (a, x), (b, y) in zip(values, values[1:]):
            if x != y:
                problems.append(f"{label}: {x!r} in the {a}, {y!r} in the {b}")
    if problems:
        raise MismatchError(f"{title}:\n  " + "\n  ".join(problems) + "\n" + (
            hint or "Use parts made together (one run or pipeline directory, or the same tokenizer and coarse map)."))
