"""Exports scikit-learn's copy of the UCI ML hand-written digits (8x8, values 0..16) to
crates/adm-data/data/digits.safetensors (u8 `images` [1797, 8, 8], u8 `labels` [1797]).

Run once by a developer (the file is committed; nothing reads Python at run time):
    /work/venv/bin/python scripts/export_digits.py
"""

from pathlib import Path

import numpy as np
from safetensors.numpy import save_file
from sklearn.datasets import load_digits

OUT = Path(__file__).resolve().parent.parent / "crates/adm-data/data/digits.safetensors"


def main():
    digits = load_digits()
    images = digits.images.astype(np.uint8)
    labels = digits.target.astype(np.uint8)
    assert images.shape == (1797, 8, 8) and images.max() == 16 and labels.max() == 9
    save_file({"images": np.ascontiguousarray(images), "labels": labels}, str(OUT))
    print(f"wrote {OUT} ({OUT.stat().st_size} bytes)")


if __name__ == "__main__":
    main()
