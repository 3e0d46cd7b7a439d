from rs_detect.cli import main

main()
