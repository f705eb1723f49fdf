"""The demo job end to end on a tiny shapes build."""

import json

from clipgen import demo
from clipgen.data import shapes_tfds


def test_demo_writes_grids_and_a_report(tmp_path):
    data = shapes_tfds.ShapesConfig(
        name="demo_test",
        resolutions=(16, 32),
        num_examples={"train": 4, "test": 6, "heldout": 6},
    )
    report = demo.run(tmp_path, data, preset="tiny")
    assert json.loads((tmp_path / "report.json").read_text()) == report
    assert (tmp_path / "shapes_16.png").exists() and (tmp_path / "shapes_32.png").exists()
    assert report["data"] == {"test": 6, "heldout": 6}
    assert report["oracle"]["test_32px"]["whole"] == 1.0
    assert "16px" not in " ".join(report["oracle"])  # the oracle reads 32 px and up
    assert report["clip"]["steps"] == 4
    assert set(report["clip"]["retrieval"]) >= {"test/text_to_image_top1"}
