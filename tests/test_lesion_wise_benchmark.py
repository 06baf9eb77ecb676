"""benchmarks/lesion_wise.py: its table from per-case rows, and the whole command on the tiny
config (synthetic MET cases with metastases, trained, postprocessing chosen both ways)."""

import json

import pytest

from benchmarks import lesion_wise


def _row(case, dice, lesion_dice, lesion_hd95, tp, fn, fp):
  row = {"case": case, "lesion_rules": "met2023"}
  for g in ("ET", "TC", "WT"):
    row.update({f"dice_{g}": dice[g], f"lesion_dice_{g}": lesion_dice[g],
                f"lesion_hd95_{g}": lesion_hd95, f"lesions_tp_{g}": tp,
                f"lesions_fn_{g}": fn, f"lesions_fp_{g}": fp})
  return row


def test_table_row_means_and_counts_by_hand():
  rows = [_row("a", {"WT": 0.9, "TC": 0.8, "ET": 0.7}, {"WT": 0.6, "TC": 0.6, "ET": 0.3}, 10.0,
               2, 1, 0),
          _row("b", {"WT": 0.7, "TC": 0.6, "ET": 0.5}, {"WT": 1.0, "TC": 0.4, "ET": 0.5}, 30.0,
               1, 0, 3)]
  out = lesion_wise.table_row("none", rows)
  assert list(out) == list(lesion_wise.COLUMNS)
  assert out["Dice WT"] == pytest.approx(0.8) and out["Dice ET"] == pytest.approx(0.6)
  assert out["Dice mean"] == pytest.approx((0.8 + 0.7 + 0.6) / 3)
  # Per region over cases: WT 0.8, TC 0.5, ET 0.4; their mean.
  assert out["lesion Dice"] == pytest.approx((0.8 + 0.5 + 0.4) / 3)
  assert out["lesion HD95"] == pytest.approx(20.0)
  assert (out["TP"], out["FN"], out["FP"]) == (3 * 3, 1 * 3, 3 * 3)
  table = lesion_wise.markdown_table([out])
  assert table.splitlines()[0] == "| " + " | ".join(lesion_wise.COLUMNS) + " |"
  assert table.splitlines()[2] == \
      "| none | 0.800 | 0.700 | 0.600 | 0.700 | 0.567 | 20.00 | 9 | 3 | 9 |"


def test_lesion_rules_off_is_refused():
  with pytest.raises(ValueError, match="--lesion_rules=off"):
    lesion_wise.parse_args(["--lesion_rules=off"])
  with pytest.raises(ValueError, match="--lesion_rules=nope: unknown rule set"):
    lesion_wise.parse_args(["--lesion_rules=nope"])


@pytest.mark.slow
def test_benchmark_on_the_tiny_config(tmp_path, capsys):
  result = lesion_wise.main([f"--workdir={tmp_path}", "--config=configs/tiny.py",
                             "--model=unet", "--cases=8", "--metastases=4",
                             "--override=num_epochs=4"])
  rows = result["table"]
  assert [r["postprocessing"] for r in rows] == list(lesion_wise.POSTPROCESSING)
  for r in rows:
    assert list(r) == list(lesion_wise.COLUMNS)
    for key in ("Dice WT", "Dice TC", "Dice ET", "Dice mean", "lesion Dice"):
      assert 0 <= r[key] <= 1, (r["postprocessing"], key)
    assert 0 <= r["lesion HD95"] <= 374  # met2023's penalty is the largest value.
    assert min(r["TP"], r["FN"], r["FP"]) >= 0
  # Postprocessing changes predictions only: the reference's counted lesions stay.
  assert len({r["TP"] + r["FN"] for r in rows}) == 1 and rows[0]["TP"] + rows[0]["FN"] > 0
  assert all(c.startswith("BraTS-MET-") for c in result["test_cases"])
  assert list(result["lesion_rules"]) == ["met2023"]
  out = capsys.readouterr().out
  assert lesion_wise.markdown_table(rows) in out and "lesion-chosen: " in out
  assert json.loads((tmp_path / "lesion_wise.json").read_text())["table"] == rows
  assert result["peak_rss_gb"]["this_process"] > 0.1 and result["peak_rss_gb"]["trainer"] > 0.1
