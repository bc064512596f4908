from lqjobs.ops.cli import main

main()
