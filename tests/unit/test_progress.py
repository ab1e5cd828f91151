import io

from rich.console import Console

from kdpipe import progress


def test_non_terminal_progress_logs_plain_lines(monkeypatch):
    sink = io.StringIO()
    monkeypatch.setattr(progress, "Console", lambda stderr: Console(file=sink, width=200))
    monkeypatch.setattr(progress, "LOG_SECONDS", 0.0)
    bar = progress.progress_bar()
    assert isinstance(bar, progress._LoggedProgress)
    with bar:
        task = bar.add_task("teacher", total=4, loss=0.5)
        bar.advance(task)
        bar.update(task, completed=2, loss=0.25)
    lines = sink.getvalue().splitlines()
    assert lines[0].startswith("teacher: 1/4 (25%)")
    assert lines[1].startswith("teacher: 2/4 (50%)") and lines[1].endswith("loss 0.25")


def test_a_task_reset_for_the_next_epoch_logs_again(monkeypatch):
    sink = io.StringIO()
    monkeypatch.setattr(progress, "Console", lambda stderr: Console(file=sink, width=200))
    monkeypatch.setattr(progress, "LOG_SECONDS", 0.0)
    with progress.progress_bar() as bar:
        task = bar.add_task("epoch 1/2", total=2)
        bar.advance(task, 2)  # epoch 1 done: rich marks the task finished
        bar.update(task, description="epoch 2/2", total=3, completed=0)
        bar.advance(task)
    assert sink.getvalue().splitlines()[-1].startswith("epoch 2/2: 1/3 (33%)")


def test_terminal_progress_is_a_live_bar(monkeypatch):
    monkeypatch.setattr(progress, "Console",
                        lambda stderr: Console(file=io.StringIO(), force_terminal=True))
    assert not isinstance(progress.progress_bar(), progress._LoggedProgress)
