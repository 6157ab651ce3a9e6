from sftscope.cli import main

main()
