#!/bin/bash
# Wait until whole-machine CPU use stays under 15% for 20 consecutive seconds (max $1 s)
end=$((SECONDS+${1:-580})); quiet=0
read -r _ a b c d e f g h _ < /proc/stat; pt=$((a+b+c+d+e+f+g+h)); pi=$((d+e))
while [ $SECONDS -lt $end ]; do
  sleep 1
  read -r _ a b c d e f g h _ < /proc/stat; t=$((a+b+c+d+e+f+g+h)); i=$((d+e))
  busy=$(( 100 * ( (t-pt) - (i-pi) ) / (t-pt+1) )); pt=$t; pi=$i
  if [ $busy -lt 15 ]; then quiet=$((quiet+1)); else quiet=0; fi
  [ $quiet -ge 20 ] && { echo idle; exit 0; }
done
echo busy; exit 1
