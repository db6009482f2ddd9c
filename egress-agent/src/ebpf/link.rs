//! The bpf(2) commands aya 0.14 does not expose: opening a pinned link and swapping the
//! program behind it (`BPF_LINK_UPDATE`), which lets a restarted agent replace its programs
//! without a moment in which the cgroup is not captured; a cgroup link's attach type and
//! cgroup (aya's `LinkInfo` has neither); and walking any map's keys by size alone
//! (`BPF_MAP_GET_NEXT_KEY`), so entries are counted without knowing the key's type.
use std::{
    ffi::CString,
    io,
    os::{
        fd::{AsFd, AsRawFd as _, BorrowedFd, FromRawFd as _, OwnedFd},
        unix::ffi::OsStrExt as _,
    },
    path::Path,
};

const BPF_OBJ_GET: libc::c_long = 7;
const BPF_LINK_UPDATE: libc::c_long = 29;
const BPF_MAP_GET_NEXT_KEY: libc::c_long = 4;
const BPF_OBJ_GET_INFO_BY_FD: libc::c_long = 15;
/// `BPF_LINK_TYPE_CGROUP`.
pub const LINK_TYPE_CGROUP: u32 = 3;

/// `union bpf_attr` for BPF_OBJ_GET.
#[repr(C)]
#[derive(Default)]
struct ObjGetAttr {
    pathname: u64,
    bpf_fd: u32,
    file_flags: u32,
    path_fd: i32,
    _pad: u32,
}

/// `union bpf_attr` for BPF_LINK_UPDATE.
#[repr(C)]
#[derive(Default)]
struct LinkUpdateAttr {
    link_fd: u32,
    new_prog_fd: u32,
    flags: u32,
    old_prog_fd: u32,
}

/// `union bpf_attr` for BPF_MAP_GET_NEXT_KEY.
#[repr(C)]
#[derive(Default)]
struct NextKeyAttr {
    map_fd: u32,
    _pad: u32,
    key: u64,
    next_key: u64,
}

/// `union bpf_attr` for BPF_OBJ_GET_INFO_BY_FD.
#[repr(C)]
#[derive(Default)]
struct InfoAttr {
    bpf_fd: u32,
    info_len: u32,
    info: u64,
}

/// The head of `struct bpf_link_info` with its `cgroup` member; the kernel fills what fits.
#[repr(C)]
#[derive(Default)]
struct RawLinkInfo {
    link_type: u32,
    id: u32,
    prog_id: u32,
    _pad: u32,
    cgroup_id: u64,
    attach_type: u32,
    _pad2: u32,
}

/// What the kernel says about one link.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LinkInfo {
    /// `BPF_LINK_TYPE_*` ([`LINK_TYPE_CGROUP`] for ours).
    pub link_type: u32,
    /// Link id (as `bpftool link` shows it).
    pub id: u32,
    /// Id of the program behind it (as `bpftool prog` shows it).
    pub prog_id: u32,
    /// cgroup links: the cgroup's id; zero once the cgroup is gone (the kernel detached the
    /// link when the cgroup was released).
    pub cgroup_id: u64,
    /// cgroup links: the `BPF_*` attach type.
    pub attach_type: u32,
}

fn sys_bpf<T>(cmd: libc::c_long, attr: &mut T) -> io::Result<libc::c_long> {
    // SAFETY: attr is a properly sized, initialised bpf_attr variant for `cmd`.
    let ret = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            cmd,
            attr as *mut T as *mut libc::c_void,
            std::mem::size_of::<T>(),
        )
    };
    if ret < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(ret)
    }
}

/// Opens the bpf object (here: a link) pinned at `path`.
pub fn open_pinned(path: &Path) -> io::Result<OwnedFd> {
    let c_path = CString::new(path.as_os_str().as_bytes())
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "NUL in path"))?;
    let mut attr = ObjGetAttr {
        pathname: c_path.as_ptr() as u64,
        ..Default::default()
    };
    let fd = sys_bpf(BPF_OBJ_GET, &mut attr)?;
    // SAFETY: the kernel returned a fresh file descriptor that we now own.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as i32) })
}

/// Atomically replaces the program attached through `link` with `program`.
pub fn update(link: BorrowedFd<'_>, program: BorrowedFd<'_>) -> io::Result<()> {
    let mut attr = LinkUpdateAttr {
        link_fd: link.as_fd().as_raw_fd() as u32,
        new_prog_fd: program.as_raw_fd() as u32,
        ..Default::default()
    };
    sys_bpf(BPF_LINK_UPDATE, &mut attr).map(drop)
}

/// The kernel's description of the link open at `link`.
pub fn info(link: BorrowedFd<'_>) -> io::Result<LinkInfo> {
    let mut raw = RawLinkInfo::default();
    let mut attr = InfoAttr {
        bpf_fd: link.as_raw_fd() as u32,
        info_len: std::mem::size_of::<RawLinkInfo>() as u32,
        info: &mut raw as *mut RawLinkInfo as u64,
    };
    sys_bpf(BPF_OBJ_GET_INFO_BY_FD, &mut attr)?;
    Ok(LinkInfo {
        link_type: raw.link_type,
        id: raw.id,
        prog_id: raw.prog_id,
        cgroup_id: if raw.link_type == LINK_TYPE_CGROUP {
            raw.cgroup_id
        } else {
            0
        },
        attach_type: raw.attach_type,
    })
}

/// The key after `key` (the first key for `None`) of the map open at `map`, written to
/// `next`, whose length must be the map's key size; `false` when there is none.
pub fn next_key(map: BorrowedFd<'_>, key: Option<&[u8]>, next: &mut [u8]) -> io::Result<bool> {
    if key.is_some_and(|k| k.len() != next.len()) {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "key and next key differ in size",
        ));
    }
    let mut attr = NextKeyAttr {
        map_fd: map.as_raw_fd() as u32,
        key: key.map_or(0, |k| k.as_ptr() as u64),
        next_key: next.as_mut_ptr() as u64,
        ..Default::default()
    };
    match sys_bpf(BPF_MAP_GET_NEXT_KEY, &mut attr) {
        Ok(_) => Ok(true),
        Err(e) if e.raw_os_error() == Some(libc::ENOENT) => Ok(false),
        Err(e) => Err(e),
    }
}

/// The name of a cgroup `BPF_*` attach type the agent uses, else its number.
pub fn attach_type_name(attach_type: u32) -> String {
    match attach_type {
        3 => "sock_ops".into(),
        10 => "connect4".into(),
        11 => "connect6".into(),
        14 => "sendmsg4".into(),
        15 => "sendmsg6".into(),
        19 => "recvmsg4".into(),
        20 => "recvmsg6".into(),
        29 => "getpeername4".into(),
        30 => "getpeername6".into(),
        34 => "sock_release".into(),
        other => format!("attach_type_{other}"),
    }
}
