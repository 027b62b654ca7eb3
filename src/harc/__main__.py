from harc.cli import main

main()
