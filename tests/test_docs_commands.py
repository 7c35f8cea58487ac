"""Every command block of README.md and docs/*.md marked `sh toy NAME` runs as printed, at toy scale, in a copy of
the project, exits 0 and writes nothing outside that copy (tests/docs_blocks.py). The studies' blocks are run by
tests/test_presets.py, which also checks their results; the others here."""
import pytest
from docs_blocks import marked_blocks, run_block
from test_presets import RUN_HERE as RUN_BY_THE_PRESETS

BLOCKS = marked_blocks()


def test_the_marked_blocks_are_found_and_each_is_run_by_a_test():
    assert set(RUN_BY_THE_PRESETS) <= set(BLOCKS)
    assert set(BLOCKS) - set(RUN_BY_THE_PRESETS) == set(HERE)


HERE = sorted(set(BLOCKS) - set(RUN_BY_THE_PRESETS))


@pytest.mark.parametrize("name", HERE)
def test_a_marked_block_runs_as_printed(name, tmp_path):
    copy, output = run_block(BLOCKS[name], tmp_path)
    if name == "pipeline":  # the default chain on synthetic_fs, with the dataset's labeler defaults (K=30)
        chain = copy / "logs" / "pipeline" / "pipeline" / "synthetic_fs_resnet12_s0"
        assert all((chain / "eval" / step / "results.json").is_file() for step in
                   ("learn_meta_repr", "learn_labeler", "fine_tune", "sup_baseline")), output[-3000:]
        assert "labeler pass 0: 30 -> " in output
