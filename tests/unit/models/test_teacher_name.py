"""Cards and tags name the default teacher by the model it is, not by 'default'."""

from kdpipe.models.teacher import checkpoint_name


def test_the_default_teacher_is_named_for_what_it_is():
    assert checkpoint_name("default").startswith("sentence-transformers/all-MiniLM-L6-v2")
    assert checkpoint_name("/models/my-bert") == "/models/my-bert"
