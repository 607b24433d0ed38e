import json

from infermatrix.reports.record import Record, append_record, read_records


def test_records_are_strict_json_with_null_for_non_finite_numbers(tmp_path):
    rec = Record(case_id="a", case={}, status="ok", metrics={"sqnr_db": float("inf"), "kl_mean": 0.0,
                                                                 "x": float("nan")})
    data = json.loads(rec.to_json(), parse_constant=lambda c: (_ for _ in ()).throw(ValueError(c)))
    assert data["metrics"] == {"sqnr_db": None, "kl_mean": 0.0, "x": None}
    append_record(tmp_path / "r.jsonl", rec)
    append_record(tmp_path / "r.jsonl", rec)
    assert [r.metrics["sqnr_db"] for r in read_records(tmp_path / "r.jsonl")] == [None, None]
