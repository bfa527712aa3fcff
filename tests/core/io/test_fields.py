import pytest

from llmctl.core.io.fields import get_field, has_field, set_field


def test_dotted_paths_read_nested_objects_and_list_items():
    record = {"meta": {"body": "hi"}, "messages": [{"content": "a"}, {"content": "b"}]}
    assert get_field(record, "meta.body") == "hi"
    assert get_field(record, "messages.1.content") == "b"
    assert has_field(record, "meta.body")
    assert not has_field(record, "meta.title")
    assert not has_field(record, "messages.5.content")


def test_missing_field_raises_key_error_naming_the_path_unless_default_given():
    with pytest.raises(KeyError, match="meta.title"):
        get_field({"meta": {}}, "meta.title")
    assert get_field({"meta": {}}, "meta.title", default=None) is None


def test_set_field_creates_parents_and_keeps_key_order():
    record = {"a": 1, "b": {"x": 1}, "c": 3}
    set_field(record, "b.y", 2)
    set_field(record, "d.e", 4)
    set_field(record, "a", 10)
    assert list(record) == ["a", "b", "c", "d"]
    assert record == {"a": 10, "b": {"x": 1, "y": 2}, "c": 3, "d": {"e": 4}}


@pytest.mark.parametrize("path", ["", "a..b", ".a", "a."])
def test_empty_path_segments_are_rejected(path):
    with pytest.raises(ValueError):
        get_field({"a": 1}, path)
