from kdpipe.models.teacher import load_tokenizer


def test_tiny_bert_tokenizer_knows_fixture_words(tiny_bert):
    tokenizer = load_tokenizer(str(tiny_bert))
    ids = tokenizer("good movie")["input_ids"]
    assert tokenizer.unk_token_id not in ids
    assert len(ids) == 4  # [CLS] good movie [SEP]


def test_make_config_points_at_tmp(make_config, tmp_path):
    cfg = make_config(**{"ingest.max_length": 64})
    assert cfg.ingest.max_length == 64
    assert cfg.paths.prepared == tmp_path / "work" / "prepared"
