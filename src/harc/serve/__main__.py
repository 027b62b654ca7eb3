"""`python -m harc.serve serve|redteam ...`: harc's CLI with the two commands mounted, until
harc.cli mounts them itself."""

from harc.cli import app, main
from harc.serve.cli import redteam_cmd, serve_cmd

app.command("serve")(serve_cmd)
app.command("redteam")(redteam_cmd)

if __name__ == "__main__":
    main()
