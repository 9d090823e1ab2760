"""Loader and index for referring-expression datasets in the REFER layout (RefCOCO, RefCOCO+, RefCOCOg).

Files: ``<data_root>/<dataset>/refs(<split_by>).p``, a pickle of ``[{ref_id, ann_id, image_id, category_id, split,
sentences: [{sent_id, sent, raw, tokens}], sent_ids, file_name}]`` (loaded with the restricted unpickler), and
``<data_root>/<dataset>/instances.json``, COCO-style ``{images, annotations, categories}``.
The index attributes keep the REFER API's names (``Refs``, ``Anns``, ``Imgs``, ...) so ALBEF users find them.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

from dataset.annotations import read_json
from refTools import safe_pickle

_REF_KEYS = ("ref_id", "ann_id", "image_id", "split", "sentences")
_TEST_LETTER_SPLITS = ("testA", "testB", "testC")
_TEST_PAIR_SPLITS = ("testAB", "testBC", "testAC")


class REFER:
    """Index of one REFER dataset: refs, their annotations (boxes), images, categories and sentences."""

    def __init__(self, data_root: str | Path, dataset: str = "refcoco+", split_by: str = "unc") -> None:
        self.dataset = dataset
        self.split_by = split_by
        self.data_dir = Path(data_root) / dataset
        self.refs_file = self.data_dir / f"refs({split_by}).p"
        self.instances_file = self.data_dir / "instances.json"
        for path in (self.refs_file, self.instances_file):
            if not path.is_file():
                raise FileNotFoundError(f"REFER file not found: {path} (dataset={dataset!r}, split_by={split_by!r})")

        refs = safe_pickle.load(self.refs_file)
        if not isinstance(refs, list):
            raise ValueError(f"{self.refs_file}: expected a list of refs, got {type(refs).__name__}")
        instances = read_json(self.instances_file, "REFER instances file")
        for key in ("images", "annotations", "categories"):
            if not isinstance(instances, dict) or not isinstance(instances.get(key), list):
                raise ValueError(f'{self.instances_file}: expected an object with an "{key}" list')
        self._build_index(refs, instances)

    def _build_index(self, refs: list, instances: dict) -> None:
        self.Anns: dict[int, dict] = {}
        self.Imgs: dict[int, dict] = {}
        self.Cats: dict[int, str] = {}
        self.imgToAnns: dict[int, list[dict]] = {}
        for index, ann in enumerate(instances["annotations"]):
            for key in ("id", "image_id", "bbox"):
                if key not in ann:
                    raise ValueError(f'{self.instances_file}: annotations[{index}] lacks "{key}"')
            self.Anns[ann["id"]] = ann
            self.imgToAnns.setdefault(ann["image_id"], []).append(ann)
        for index, image in enumerate(instances["images"]):
            for key in ("id", "height", "width"):
                if key not in image:
                    raise ValueError(f'{self.instances_file}: images[{index}] lacks "{key}"')
            self.Imgs[image["id"]] = image
        for cat in instances["categories"]:
            self.Cats[cat["id"]] = cat["name"]

        self.Refs: dict[int, dict] = {}
        self.refToAnn: dict[int, dict] = {}
        self.annToRef: dict[int, dict] = {}
        self.imgToRefs: dict[int, list[dict]] = {}
        self.catToRefs: dict[int, list[dict]] = {}
        self.Sents: dict[int, dict] = {}
        self.sentToRef: dict[int, dict] = {}
        for index, ref in enumerate(refs):
            if not isinstance(ref, dict) or any(key not in ref for key in _REF_KEYS):
                raise ValueError(f"{self.refs_file}: ref {index} must be a dict with keys {list(_REF_KEYS)}")
            if ref["ann_id"] not in self.Anns:
                raise ValueError(
                    f"{self.refs_file}: ref {index} (ref_id {ref['ref_id']}) points to ann_id {ref['ann_id']}, "
                    f"which is not in {self.instances_file}"
                )
            ref_id = ref["ref_id"]
            self.Refs[ref_id] = ref
            self.refToAnn[ref_id] = self.Anns[ref["ann_id"]]
            self.annToRef[ref["ann_id"]] = ref
            self.imgToRefs.setdefault(ref["image_id"], []).append(ref)
            if "category_id" in ref:
                self.catToRefs.setdefault(ref["category_id"], []).append(ref)
            for sent in ref["sentences"]:
                self.Sents[sent["sent_id"]] = sent
                self.sentToRef[sent["sent_id"]] = ref

    @staticmethod
    def _in_split(ref_split: str, split: str) -> bool:
        """REFER's split semantics: 'testA' also selects refs of 'testAB'/'testAC'; 'test' selects every test split."""
        if split in _TEST_LETTER_SPLITS:
            return ref_split.startswith("test") and split[-1] in ref_split[4:]
        if split == "test":
            return "test" in ref_split
        return ref_split == split

    def get_ref_ids(
        self,
        image_ids: Iterable[int] | None = None,
        cat_ids: Iterable[int] | None = None,
        ref_ids: Iterable[int] | None = None,
        split: str | None = None,
    ) -> list[int]:
        """Ref ids, optionally restricted to some images, categories, refs and one split."""
        if image_ids is not None:
            refs = [ref for image_id in image_ids for ref in self.imgToRefs.get(image_id, [])]
        else:
            refs = list(self.Refs.values())
        if cat_ids is not None:
            wanted = set(cat_ids)
            refs = [ref for ref in refs if ref.get("category_id") in wanted]
        if ref_ids is not None:
            wanted = set(ref_ids)
            refs = [ref for ref in refs if ref["ref_id"] in wanted]
        if split is not None:
            known = {"train", "val", "test", *_TEST_LETTER_SPLITS, *_TEST_PAIR_SPLITS}
            if split not in known:
                raise ValueError(f"unknown split {split!r}; expected one of {sorted(known)}")
            refs = [ref for ref in refs if self._in_split(ref["split"], split)]
        return [ref["ref_id"] for ref in refs]

    def get_ref(self, ref_id: int) -> dict:
        if ref_id not in self.Refs:
            raise ValueError(f"ref_id {ref_id} is not in {self.refs_file}")
        return self.Refs[ref_id]

    def get_ref_box(self, ref_id: int) -> list[float]:
        """Ground-truth box ``[x, y, w, h]`` (pixels) of the object a ref describes."""
        self.get_ref(ref_id)
        return list(self.refToAnn[ref_id]["bbox"])

    def get_image(self, ref_id: int) -> dict:
        """The COCO image record (``id``, ``height``, ``width``, ``file_name``) of a ref."""
        image_id = self.get_ref(ref_id)["image_id"]
        if image_id not in self.Imgs:
            raise ValueError(f"ref_id {ref_id}: image_id {image_id} is not in {self.instances_file}")
        return self.Imgs[image_id]
