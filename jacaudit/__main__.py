from jacaudit.cli.main import main

main()
