#!/bin/sh
# PID 1 of the test guest (busybox sh). It checks the data disk's files against their manifest, says
# so on the console, optionally writes new files (the workload), answers the QEMU guest agent protocol
# on its virtio-serial port and shuts down cleanly on an ACPI power button press or a guest-shutdown.
#
# Console lines other programs read (sites/guest/build.py records their patterns in guest.json):
#   ASR-CHECK: PASS <n> files | ASR-CHECK: FAIL <details>   exactly one per boot
#   ASR-GUEST-READY <boot-id>                               once the check is done
#   ASR-WORKLOAD: <count> files, ASR-WORKLOAD-DONE <count>  the workload's progress and end
#   ASR-FREEZE, ASR-THAW                                    the agent froze / thawed /data
#   ASR-GUEST-POWEROFF                                      /data is unmounted, power goes off now
#   ASR-GUEST-ERROR <reason>                                the guest cannot do its job, power goes off
# Data disk: the first virtio disk that mounts as ext4 (the boot disk of a guest booted from a disk is FAT).
# Kernel command line: asr.workload=<KiB/s> (0 or absent: none), asr.write_files=<n> (write exactly n
# files, then stop), asr.agent=0 (no guest agent).
export PATH=/bin:/sbin
RUN=/run/asr
DATA=/data
MANIFEST=MANIFEST.sha256
# Files the workload writes in a row before it prints a progress line.
PROGRESS_EVERY=10

say() { echo "$*" > /dev/console; }

power_off_now() {
    sync
    poweroff -f
    sleep 5  # poweroff -f does not return; if it did, exiting PID 1 panics, and panic=-1 ends QEMU
    exit 1
}

fatal() {
    say "ASR-GUEST-ERROR $*"
    power_off_now
}

cmdline_value() {  # cmdline_value KEY DEFAULT
    for word in $(cat /proc/cmdline); do
        case "$word" in "$1="*) echo "${word#*=}"; return;; esac
    done
    echo "$2"
}

is_number() { case "$1" in ''|*[!0-9]*) return 1;; esac; return 0; }

# ---- the clean shutdown (power button or guest agent) ---------------------------------------------
clean_shutdown() {
    mkdir "$RUN/shutdown" 2>/dev/null || { sleep 30; return; }  # another caller is shutting down already
    touch "$RUN/stop"
    # The workload finishes the file it is writing (data, then its manifest line) and exits.
    waited=0
    while [ -e "$RUN/workload.running" ] && [ $waited -lt 100 ]; do usleep 100000; waited=$((waited + 1)); done
    [ -e "$RUN/frozen" ] && fsfreeze --unfreeze $DATA && rm -f "$RUN/frozen"
    [ -e "$RUN/workload.pid" ] && kill -9 "$(cat $RUN/workload.pid)" 2>/dev/null
    sync
    umount $DATA 2>/dev/null || mount -o remount,ro $DATA
    say "ASR-GUEST-POWEROFF"
    power_off_now
}

# The power button driver (button.ko) reports a press as a key event on the input device named
# "Power Button"; reading one event from it blocks until the press. (This kernel has no /proc/acpi/event.)
# A press while nobody has the device open is lost, so the device is opened before `button.ready` says
# the watcher is listening, and boot waits for that before its heartbeat.
watch_power_button() {
    for name in /sys/class/input/event*/device/name; do
        [ -e "$name" ] || continue
        if [ "$(cat "$name")" = "Power Button" ]; then
            event=${name%/device/name}
            device=/dev/input/${event##*/}
            exec 4< "$device" || { say "ASR-GUEST-ERROR cannot open the power button $device"; touch "$RUN/button.ready"; return; }
            touch "$RUN/button.ready"
            # One input_event is 24 bytes on x86_64; a shorter read is refused.
            if error=$(dd of=/dev/null bs=24 count=1 <&4 2>&1); then
                clean_shutdown
            else
                say "ASR-GUEST-ERROR cannot read the power button ($device): $error"
            fi
            return
        fi
    done
    touch "$RUN/button.ready"
    say "ASR-GUEST-ERROR no ACPI power button input device: only a guest-shutdown powers this guest off cleanly"
}

# ---- the workload -----------------------------------------------------------------------------------
# Each file is written and synced BEFORE its manifest line is appended (and synced in turn): whatever
# moment a crash-consistent image of the disk is taken at, every line of the manifest names a file
# whose data was already durable, so the next boot's check must pass. A file without its line is
# allowed (the crash came between the two syncs) and is simply not checked.
workload() {
    rate_kib=$1 limit=$2
    mkdir -p $DATA/files
    boot=$(cut -c1-8 /proc/sys/kernel/random/boot_id)
    count=0
    while [ ! -e "$RUN/stop" ]; do
        [ "$limit" -gt 0 ] && [ $count -ge "$limit" ] && break
        if [ -e "$RUN/pause" ]; then  # a freeze is coming: hold still between two files
            touch "$RUN/paused"
            usleep 50000
            continue
        fi
        rm -f "$RUN/paused"
        kib=$((4 + RANDOM % 1021))
        name=files/$boot-$count
        dd if=/dev/urandom of=$DATA/$name bs=1024 count=$kib 2>/dev/null || fatal "cannot write $DATA/$name"
        sync
        (cd $DATA && sha256sum $name >> $MANIFEST) || fatal "cannot append to $DATA/$MANIFEST"
        sync
        count=$((count + 1))
        [ $((count % PROGRESS_EVERY)) -eq 0 ] && say "ASR-WORKLOAD: $count files"
        [ "$rate_kib" -gt 0 ] && usleep $((kib * 1000000 / rate_kib))
    done
    say "ASR-WORKLOAD-DONE $count"
    rm -f "$RUN/workload.running" "$RUN/paused"
}

# ---- the guest agent (QEMU guest agent protocol, the few commands the engine uses) --------------------
# One JSON command per line; the protocol is fixed, so sed extracts the two fields it needs.
agent_reply() { printf '%s\n' "$1" >&3; }

agent_freeze() {
    if [ ! -e "$RUN/frozen" ]; then
        touch "$RUN/pause"
        waited=0  # the workload pauses between two files, within one file's write
        while [ -e "$RUN/workload.running" ] && [ ! -e "$RUN/paused" ] && [ $waited -lt 300 ]; do
            usleep 100000; waited=$((waited + 1))
        done
        sync
        fsfreeze --freeze $DATA || { rm -f "$RUN/pause"; return 1; }
        touch "$RUN/frozen"
        say "ASR-FREEZE"
    fi
    return 0
}

agent_thaw() {
    if [ -e "$RUN/frozen" ]; then
        fsfreeze --unfreeze $DATA || return 1
        rm -f "$RUN/frozen"
        say "ASR-THAW"
    fi
    rm -f "$RUN/pause"
    return 0
}

agent_handle() {
    command=$(echo "$1" | sed -n 's/.*"execute" *: *"\([^"]*\)".*/\1/p')
    case "$command" in
        guest-sync|guest-sync-delimited)
            id=$(echo "$1" | sed -n 's/.*"id" *: *\(-\{0,1\}[0-9][0-9]*\).*/\1/p')
            [ "$command" = guest-sync-delimited ] && printf '\377' >&3
            agent_reply "{\"return\": ${id:-0}}";;
        guest-ping) agent_reply '{"return": {}}';;
        guest-info) agent_reply '{"return": {"version": "asr-test-guest", "supported_commands": []}}';;
        guest-fsfreeze-freeze)
            if agent_freeze; then agent_reply '{"return": 1}'
            else agent_reply '{"error": {"class": "GenericError", "desc": "fsfreeze of /data failed"}}'; fi;;
        guest-fsfreeze-thaw)
            if agent_thaw; then agent_reply '{"return": 1}'
            else agent_reply '{"error": {"class": "GenericError", "desc": "thaw of /data failed"}}'; fi;;
        guest-fsfreeze-status)
            if [ -e "$RUN/frozen" ]; then agent_reply '{"return": "frozen"}'; else agent_reply '{"return": "thawed"}'; fi;;
        guest-shutdown)
            clean_shutdown &  # qemu-ga sends no reply to a successful guest-shutdown either
            ;;
        "") agent_reply '{"error": {"class": "GenericError", "desc": "not a command object"}}';;
        *) agent_reply "{\"error\": {\"class\": \"CommandNotFound\", \"desc\": \"The command $command has not been found\"}}";;
    esac
}

guest_agent() {
    port=
    for name in /sys/class/virtio-ports/*/name; do
        [ -e "$name" ] && [ "$(cat "$name")" = org.qemu.guest_agent.0 ] && port=${name%/name} && port=${port##*/}
    done
    if [ -z "$port" ]; then say "ASR-GUEST-ERROR no virtio-serial port org.qemu.guest_agent.0: no guest agent"; return; fi
    exec 3<>/dev/$port
    while :; do
        # read returns at once with nothing while no client is connected: poll then, gently (every
        # 0.5 s: ~2% of a host core per idle TCG guest; at 0.2 s it was ~4%), which is also the longest
        # a new client waits for its first answer.
        if IFS= read -r line <&3; then
            line=$(printf '%s' "$line" | tr -d '\377\r')  # a client may send 0xFF to reset the parser
            [ -n "$line" ] && agent_handle "$line"
        else
            usleep 500000
        fi
    done
}

# ---- boot -------------------------------------------------------------------------------------------
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
mkdir -p $RUN $DATA
for module in $(cat /etc/asr-modules); do
    modprobe "$module" || say "ASR-GUEST-ERROR cannot load module $module"
done

rate=$(cmdline_value asr.workload 0)
limit=$(cmdline_value asr.write_files 0)
is_number "$rate" || fatal "asr.workload=$rate is not a whole number of KiB per second"
is_number "$limit" || fatal "asr.write_files=$limit is not a whole number of files"

watch_power_button &

waited=0  # the disks appear once virtio_blk has probed them
while [ ! -b /dev/vda ] && [ $waited -lt 50 ]; do usleep 100000; waited=$((waited + 1)); done
[ -b /dev/vda ] || fatal "no data disk /dev/vda"
# The data disk is the first virtio disk holding ext4: /dev/vda for a guest booted from its kernel file,
# the disk after its boot disk (FAT, which the ext4 driver refuses without writing) for one booted from it.
data_disk= tried=
for disk in /dev/vd[a-z]; do
    [ -b "$disk" ] || continue
    mount -t ext4 "$disk" $DATA 2>/dev/null && data_disk=$disk && break
    tried="${tried:+$tried, }$disk"
done
[ -n "$data_disk" ] || fatal "cannot mount $tried as ext4 at $DATA"

# The check comes before anything in this boot writes to /data.
# A missing or empty manifest (a crash between creating it and its first line) names nothing: it passes.
total=$(grep -c . $DATA/$MANIFEST 2>/dev/null)
if [ "${total:-0}" -gt 0 ]; then
    results=$(cd $DATA && sha256sum -c $MANIFEST 2>&1)
    good=$(echo "$results" | grep -c ': OK$')
    if [ "$good" -eq "$total" ] && [ "$(echo "$results" | grep -v ': OK$' | grep -c .)" -eq 0 ]; then
        say "ASR-CHECK: PASS $total files"
    else
        bad=$(echo "$results" | grep -v ': OK$' | head -5 | tr '\n' ' ')
        say "ASR-CHECK: FAIL $((total - good)) of $total files: $bad"
    fi
else
    say "ASR-CHECK: PASS 0 files"
fi
waited=0
while [ ! -e "$RUN/button.ready" ] && [ $waited -lt 50 ]; do usleep 100000; waited=$((waited + 1)); done
say "ASR-GUEST-READY $(cat /proc/sys/kernel/random/boot_id)"

[ "$(cmdline_value asr.agent 1)" = 0 ] || guest_agent &

if [ "$rate" -gt 0 ] || [ "$limit" -gt 0 ]; then
    touch "$RUN/workload.running"  # before it starts, so a shutdown right now waits for it
    workload "$rate" "$limit" &
    echo $! > "$RUN/workload.pid"
fi

# PID 1 must not exit (the kernel would panic): reap children until the power goes off.
while :; do wait; sleep 1; done
