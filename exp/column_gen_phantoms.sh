L=${LUMBAR_NODE:-lumbar-node}  # run inside an empty folder: writes r1-r6, l1-l3
g(){ $L phantom --out $1 --subjects 40 --seed $2 --mode $3 --matrix $4 --spacing $5 --no-sagittal --no-distractor > /dev/null 2>&1; echo done $1; }
(g r1 5101 randomised 448 0.55; g r2 5102 randomised 384 0.65; g r3 5103 randomised 320 0.8; g l1 5201 realistic 320 0.7; g l3 5203 realistic 512 0.45) &
(g r4 5104 randomised 512 0.5; g r5 5105 randomised 256 1.0; g r6 5106 randomised 384 0.75; g l2 5202 realistic 384 0.6) &
wait
