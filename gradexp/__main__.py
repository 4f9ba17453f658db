from gradexp.cli import app

app(prog_name="gradexp")
