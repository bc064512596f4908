from lqjobs.cli import main

main()
