"""Stage 2's proposal files as stages 3 and 4 read them (resnext_det/unshared/proposals.py; Xie et
al., CVPR 2017, Appendix B): files that do not match their dataset are refused, saying what
differs and how to fix it; Detectron (v1) key names are read as Detectron2 reads them; a file
counts as written only with its metadata beside it.
"""
import copy
import json
import os
import pickle

import numpy as np
import pytest

from detectron2.data import DatasetCatalog
from detectron2.data.build import load_proposals_into_dataset

from resnext_det.unshared import ProposalFileMismatch, check_proposal_file
from resnext_det.unshared.proposals import proposal_file_meta
from unshared_runs import _write

pytestmark = pytest.mark.usefixtures("one_thread")


def test_mismatched_proposal_files_are_refused(tmp_path):
    name = "unshared_test_five_images"
    if name not in DatasetCatalog.list():
        DatasetCatalog.register(name, lambda: [{"image_id": i, "file_name": f"{i}.jpg"} for i in range(1, 6)])
    dicts = DatasetCatalog.get(name)

    good = check_proposal_file(_write(tmp_path / "good.pkl", [5, 4, 3, 2, 1]), name)
    assert len(good["ids"]) == 5

    extra = _write(tmp_path / "extra.pkl", [1, 2, 3, 4, 5, 6, 7])
    # Detectron2 itself takes this file silently (it ignores the ids it does not know) ...
    load_proposals_into_dataset(copy.deepcopy(dicts), extra)
    # ... we refuse it, and say what differs and how to fix it.
    msg = r"it has 7 images, the dataset 5.*2 ids are not in the dataset.*--stage proposals"
    with pytest.raises(ProposalFileMismatch, match=msg):
        check_proposal_file(extra, name)
    missing = _write(tmp_path / "missing.pkl", [1, 2, 3, 4])
    with pytest.raises(KeyError):  # Detectron2: a bare KeyError
        load_proposals_into_dataset(copy.deepcopy(dicts), missing)
    with pytest.raises(ProposalFileMismatch, match=r"1 dataset images have no proposals: '5'"):
        check_proposal_file(missing, name)
    other = _write(tmp_path / "other.pkl", [11, 12, 13, 14, 15])  # same length, other images
    with pytest.raises(ProposalFileMismatch, match="no proposals"):
        check_proposal_file(other, name)
    dup = _write(tmp_path / "dup.pkl", [1, 2, 3, 4, 5, 5])
    with pytest.raises(ProposalFileMismatch, match="more than once"):
        check_proposal_file(dup, name)
    bad_shape = tmp_path / "shape.pkl"
    data = pickle.load(open(_write(bad_shape, [1, 2, 3, 4, 5]), "rb"))
    data["objectness_logits"][2] = data["objectness_logits"][2][:2]
    pickle.dump(data, open(bad_shape, "wb"))
    with pytest.raises(ProposalFileMismatch, match=r"image '3'.*\(N, 4\) and \(N,\)"):
        check_proposal_file(str(bad_shape), name)
    with pytest.raises(FileNotFoundError, match="stage 2"):
        check_proposal_file(str(tmp_path / "nope.pkl"), name)


def test_proposal_mismatch_messages_name_three_ids_in_string_order_and_the_count(tmp_path):
    """The examples in a refusal: the first three missing ids in string order (the ids are
    compared as strings: '10' < '2'), then the count when there are more. Typed in by hand."""
    name = "unshared_test_twelve_images"
    if name not in DatasetCatalog.list():
        DatasetCatalog.register(name, lambda: [{"image_id": i, "file_name": f"{i}.jpg"} for i in range(1, 13)])
    four_missing = _write(tmp_path / "four.pkl", [1, 3, 4, 5, 6, 7, 8, 9])  # no 2, 10, 11, 12
    with pytest.raises(ProposalFileMismatch) as e:
        check_proposal_file(four_missing, name)
    assert "4 dataset images have no proposals: '10', '11', '12', ... (4 in all). Delete it" in str(e.value)
    three_missing = _write(tmp_path / "three.pkl", [1, 3, 4, 5, 6, 7, 8, 9, 12])  # no 2, 10, 11
    with pytest.raises(ProposalFileMismatch) as e:
        check_proposal_file(three_missing, name)
    assert "3 dataset images have no proposals: '10', '11', '2'. Delete it" in str(e.value)
    one_extra = _write(tmp_path / "extra.pkl", list(range(1, 14)))
    with pytest.raises(ProposalFileMismatch) as e:
        check_proposal_file(one_extra, name)
    assert "1 ids are not in the dataset: '13'. Delete it" in str(e.value)


def test_proposal_files_in_detectron_v1_names_and_malformed_ones(tmp_path):
    """Detectron (v1) key names ('indexes', 'scores') are read as Detectron2 reads them; files
    that are not Detectron2's format are refused, saying what is wrong."""
    name = "unshared_test_five_images"
    if name not in DatasetCatalog.list():
        DatasetCatalog.register(name, lambda: [{"image_id": i, "file_name": f"{i}.jpg"} for i in range(1, 6)])
    d2 = pickle.load(open(_write(tmp_path / "d2.pkl", [1, 2, 3, 4, 5]), "rb"))
    v1 = {"indexes": d2["ids"], "boxes": d2["boxes"], "scores": d2["objectness_logits"]}  # no bbox_mode
    with open(tmp_path / "v1.pkl", "wb") as f:
        pickle.dump(v1, f)
    got = check_proposal_file(str(tmp_path / "v1.pkl"), name)
    ref = load_proposals_into_dataset(copy.deepcopy(DatasetCatalog.get(name)), str(tmp_path / "v1.pkl"))
    assert got["ids"] == [r["image_id"] for r in ref] and got["bbox_mode"] == ref[0]["proposal_bbox_mode"] == 0
    for r, b, s in zip(ref, got["boxes"], got["objectness_logits"]):
        order = np.argsort(s)[::-1]  # Detectron2 sorts them, best first
        np.testing.assert_array_equal(r["proposal_boxes"], b[order])
        np.testing.assert_array_equal(r["proposal_objectness_logits"], s[order])
    assert "indexes" not in got and "scores" not in got

    def refused(obj, fname):
        path = str(tmp_path / fname)
        with open(path, "wb") as f:
            pickle.dump(obj, f)
        with pytest.raises(ProposalFileMismatch) as e:
            check_proposal_file(path, name)
        assert repr(path) in str(e.value)
        return str(e.value)

    assert "holds a list, not the dict with 'ids', 'boxes', 'objectness_logits'" in refused([1, 2], "list.pkl")
    assert "lacks the key(s) ['objectness_logits']" in refused({"ids": [1], "boxes": []}, "keys.pkl")
    assert "lacks the key(s) ['ids', 'boxes']" in refused({"objectness_logits": []}, "keys2.pkl")
    msg = refused(dict(d2, boxes=d2["boxes"][:4]), "short.pkl")
    assert "is inconsistent: 5 ids, 4 box arrays, 5 logit arrays. Delete it" in msg
    assert "inconsistent: 5 ids, 5 box arrays, 3 logit arrays" in refused(
        dict(d2, objectness_logits=d2["objectness_logits"][:3]), "short2.pkl")
    flat = dict(d2, boxes=[b.reshape(-1) for b in d2["boxes"]])
    assert "image '1': boxes of shape (12,)" in refused(flat, "flat.pkl")
    five = dict(d2, boxes=[np.zeros((3, 5), np.float32)] * 5)
    assert "image '1': boxes of shape (3, 5)" in refused(five, "five.pkl")


def test_proposal_file_meta_needs_the_file_and_its_companion(tmp_path):
    f = _write(tmp_path / "p.pkl", [1])
    assert proposal_file_meta(f) is None
    with open(f + ".json", "w") as fh:
        json.dump({"dataset": "d", "post_nms_topk": 7}, fh)
    assert proposal_file_meta(f) == {"dataset": "d", "post_nms_topk": 7}
    os.remove(f)
    assert proposal_file_meta(f) is None
