from kdpipe.cli import app

app(prog_name="kdpipe")
