import kvstack.serve


def test_all_is_the_sorted_public_surface() -> None:
    public = sorted(n for n in dir(kvstack.serve) if not n.startswith("_") and n != "errors")
    public = [n for n in public if n not in ("annotations", "cli")]
    assert kvstack.serve.__all__ == sorted(
        kvstack.serve.__all__, key=lambda n: (not n.isupper(), n)
    )
    assert set(kvstack.serve.__all__) == set(public)
