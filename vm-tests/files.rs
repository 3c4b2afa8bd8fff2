//! File operations: each POSIX operation once with a check of its effect, many small files,
//! and fio with verification.

use crate::harness::{Guest, Result, VmTest};

/// create/write/read, append, overwrite, holes, rename, mkdir/rmdir, symlink, hard link,
/// xattrs, chmod/chown, truncate, timestamps, readdir and unlink, each checked.
pub fn round_trip(vm: &VmTest) -> Result<()> {
    let daemon = vm.daemon().start()?;
    Guest::new(&daemon)
        .script(ROUND_TRIP)
        .run()?
        .expect_success()?;
    Ok(())
}

const ROUND_TRIP: &str = r#"
step mount
mount -t virtiofs "$TAG" /mnt
mkdir /mnt/rt
cd /mnt/rt

step "create, write, read"
printf 'hello pohmelfs\n' > file
expect_eq "$(cat file)" "hello pohmelfs" "content"
expect_eq "$(stat -c %s file)" 15 "size after write"
expect_eq "$(stat -c %F file)" "regular file" "type"

step append
printf 'second line\n' >> file
expect_eq "$(wc -l < file)" 2 "lines after append"
expect_eq "$(stat -c %s file)" 27 "size after append"

step "overwrite in place"
printf 'J' | dd of=file bs=1 seek=0 conv=notrunc 2>/dev/null
expect_eq "$(head -n 1 file)" "Jello pohmelfs" "first line after overwrite"

step "write past the end leaves a hole of zeros"
printf 'tail' | dd of=file bs=1 seek=100 conv=notrunc 2>/dev/null
expect_eq "$(stat -c %s file)" 104 "size after write at 100"
{ printf 'Jello pohmelfs\nsecond line\n'; head -c 73 /dev/zero; printf 'tail'; } > /tmp/expected
cmp file /tmp/expected

step "copy a 1 MB file"
head -c 1000000 /dev/urandom > /tmp/random
cp /tmp/random copy
cmp /tmp/random copy

step "rename within a directory"
mv copy renamed
[ ! -e copy ] || fail "old name still exists after rename"
cmp /tmp/random renamed

step "rename across directories"
mkdir sub
mv renamed sub/moved
[ ! -e renamed ] || fail "old name still exists after rename"
cmp /tmp/random sub/moved

step "rename over an existing file"
printf 'victim' > victim
mv sub/moved victim
[ ! -e sub/moved ] || fail "source still exists after rename over a file"
cmp /tmp/random victim

step "mkdir, rmdir"
mkdir -p a/b/c
expect_eq "$(stat -c %F a/b/c)" "directory" "type of a/b/c"
if rmdir a 2>/dev/null; then fail "rmdir of a non-empty directory succeeded"; fi
rmdir a/b/c a/b a
[ ! -e a ] || fail "a still exists after rmdir"

step symlink
ln -s victim link
expect_eq "$(readlink link)" "victim" "link target"
expect_eq "$(stat -c %F link)" "symbolic link" "type of link"
cmp link /tmp/random
ln -s /does/not/exist dangling
expect_eq "$(readlink dangling)" "/does/not/exist" "dangling link target"

step "hard link"
ln victim hard
expect_eq "$(stat -c %h victim)" 2 "link count with two names"
expect_eq "$(stat -c %i hard)" "$(stat -c %i victim)" "inode of the second name"
printf 'more' >> hard
cmp hard victim
rm hard
expect_eq "$(stat -c %h victim)" 1 "link count after unlinking one name"
expect_eq "$(stat -c %s victim)" 1000004 "size after append through the other name"

step xattr
setfattr -n user.color -v blue victim
expect_eq "$(getfattr --only-values -n user.color victim)" "blue" "user.color"
setfattr -n user.shape -v round victim
getfattr -d victim | grep -q '^user.shape="round"$' || fail "getfattr -d: $(getfattr -d victim)"
setfattr -x user.color victim
if getfattr -n user.color victim >/dev/null 2>&1; then fail "removed xattr still readable"; fi

step chmod
chmod 640 victim
expect_eq "$(stat -c %a victim)" 640 "mode of victim"
chmod 700 sub
expect_eq "$(stat -c %a sub)" 700 "mode of sub"

step chown
chown 1000:1000 victim
expect_eq "$(stat -c %u:%g victim)" "1000:1000" "owner"

step truncate
truncate -s 10 victim
expect_eq "$(stat -c %s victim)" 10 "size after truncate to 10"
head -c 10 /tmp/random > /tmp/expected
cmp victim /tmp/expected
truncate -s 5000 victim
expect_eq "$(stat -c %s victim)" 5000 "size after extending to 5000"
{ head -c 10 /tmp/random; head -c 4990 /dev/zero; } > /tmp/expected
cmp victim /tmp/expected
truncate -s 0 victim
expect_eq "$(stat -c %s victim)" 0 "size after truncate to 0"

step "set mtime"
touch -d '2001-02-03 04:05:06' victim
expect_eq "$(stat -c %Y victim)" 981173106 "mtime"

step readdir
expect_eq "$(ls -A | sort | tr '\n' ' ')" "dangling file link sub victim " "directory listing"

step unlink
rm file link dangling victim
rmdir sub
expect_eq "$(ls -A)" "" "listing after unlink"
cd /
rmdir /mnt/rt
umount /mnt
"#;

/// 5,000 small files: created, listed (from the daemon, not the cache), read, removed.
pub fn many_small_files(vm: &VmTest) -> Result<()> {
    let daemon = vm.daemon().start()?;
    Guest::new(&daemon)
        .script(
            r#"
step mount
mount -t virtiofs "$TAG" /mnt
mkdir /mnt/many
step "create 5000 files"
i=0
while [ $i -lt 5000 ]; do
	echo "file $i" > /mnt/many/f$i
	i=$((i + 1))
done
echo 3 > /proc/sys/vm/drop_caches
step list
expect_eq "$(ls /mnt/many | wc -l)" 5000 "files listed by ls"
expect_eq "$(find /mnt/many -type f | wc -l)" 5000 "files found by find"
expect_eq "$(cat /mnt/many/f0)" "file 0" "content of f0"
expect_eq "$(cat /mnt/many/f4321)" "file 4321" "content of f4321"
step remove
rm /mnt/many/f*
expect_eq "$(ls -A /mnt/many | wc -l)" 0 "files left after rm"
rmdir /mnt/many
umount /mnt
"#,
        )
        .run()?
        .expect_success()?;
    Ok(())
}

/// fio random writes and mixed random reads/writes, every block verified by crc32c.
pub fn fio_verify(vm: &VmTest) -> Result<()> {
    let daemon = vm.daemon().start()?;
    Guest::new(&daemon)
        .with_fio()
        .script(
            r#"
step mount
mount -t virtiofs "$TAG" /mnt
mkdir /mnt/fio
step "fio randwrite, then verify"
fio --name=randwrite --directory=/mnt/fio --size=32M --bs=4k --rw=randwrite \
	--ioengine=psync --verify=crc32c --do_verify=1 --verify_fatal=1 --fsync_on_close=1
step "fio randrw with verify"
fio --name=randrw --directory=/mnt/fio --size=16M --bs=16k --rw=randrw \
	--ioengine=psync --verify=crc32c --verify_fatal=1 --fsync=32
rm -r /mnt/fio
umount /mnt
"#,
        )
        .run()?
        .expect_success()?;
    Ok(())
}
