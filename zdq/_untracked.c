/* zdq._untracked: objects the garbage collector does not walk (see zdq/client/window.py, MapFuture).
 *
 * queue_pool.map returns a future per item: a million items are a million small objects that stay
 * alive until their results are read. CPython's collector walks every live tracked object in each
 * of its full collections (seven during a map of a million items), which cost the map three times
 * what its tasks did. A map's future holds nothing but its chunk and its index, so it cannot be
 * part of a reference cycle until it holds something more; the collector need not see it until
 * then, as CPython itself leaves tuples and dicts of atoms untracked until they hold more.
 *
 * slotted(cls, n, slot_a, value_a, slot_b, values_b) makes n instances of cls as object.__new__
 * does (no __init__), sets slot_a to value_a in each and slot_b to values_b[i] in the i-th, and
 * leaves them untracked. track(obj) hands an object back to the collector (a no-op if it is
 * tracked already): its class does that as soon as the object may hold anything else.
 *
 * Optional: without a C compiler at install, zdq makes the same objects in Python, tracked.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <structmember.h>

/* The byte offset of an object slot of `cls` (a member descriptor of one of its bases). */
static Py_ssize_t
slot_offset(PyTypeObject *cls, PyObject *descr)
{
    if (!Py_IS_TYPE(descr, &PyMemberDescr_Type)) {
        PyErr_Format(PyExc_TypeError, "slotted() needs a slot's descriptor, got %R", descr);
        return -1;
    }
    PyMemberDescrObject *member = (PyMemberDescrObject *)descr;
    if (!PyType_IsSubtype(cls, PyDescr_TYPE(member))) {
        PyErr_Format(PyExc_TypeError, "slotted(): %R is not a slot of %R", descr, (PyObject *)cls);
        return -1;
    }
    if (member->d_member->type != T_OBJECT_EX || (member->d_member->flags & READONLY)) {
        PyErr_Format(PyExc_TypeError, "slotted(): %R is not a writable object slot", descr);
        return -1;
    }
    return member->d_member->offset;
}

static PyObject *
slotted(PyObject *module, PyObject *args)
{
    PyTypeObject *cls;
    Py_ssize_t n;
    PyObject *slot_a, *value_a, *slot_b, *values_b;
    if (!PyArg_ParseTuple(args, "O!nOOOO:slotted", &PyType_Type, &cls, &n, &slot_a, &value_a, &slot_b, &values_b)) {
        return NULL;
    }
    if (cls->tp_new != PyBaseObject_Type.tp_new || !PyType_IS_GC(cls)) {
        PyErr_Format(PyExc_TypeError, "slotted(): %R must be made by object.__new__ and collected", (PyObject *)cls);
        return NULL;
    }
    if (n < 0) {
        PyErr_SetString(PyExc_ValueError, "slotted(): n must be >= 0");
        return NULL;
    }
    Py_ssize_t offset_a = slot_offset(cls, slot_a);
    if (offset_a < 0) {
        return NULL;
    }
    Py_ssize_t offset_b = slot_offset(cls, slot_b);
    if (offset_b < 0) {
        return NULL;
    }
    if (offset_a == offset_b) {
        PyErr_SetString(PyExc_ValueError, "slotted(): two different slots are needed");
        return NULL;
    }
    PyObject *seq = PySequence_Fast(values_b, "slotted(): values_b must be a sequence");
    if (seq == NULL) {
        return NULL;
    }
    if (PySequence_Fast_GET_SIZE(seq) < n) {
        Py_DECREF(seq);
        PyErr_Format(PyExc_ValueError, "slotted(): %zd values for %zd objects", PySequence_Fast_GET_SIZE(seq), n);
        return NULL;
    }
    PyObject *empty = PyTuple_New(0);
    PyObject *out = empty == NULL ? NULL : PyList_New(n);
    if (out == NULL) {
        Py_XDECREF(empty);
        Py_DECREF(seq);
        return NULL;
    }
    PyObject **values = PySequence_Fast_ITEMS(seq);
    for (Py_ssize_t i = 0; i < n; i++) {
        /* object.__new__(cls): the instance's dict and weak references set up as for any other. */
        PyObject *obj = PyBaseObject_Type.tp_new(cls, empty, NULL);
        if (obj == NULL) {
            Py_DECREF(out);  /* the objects made so far go with it */
            Py_DECREF(empty);
            Py_DECREF(seq);
            return NULL;
        }
        Py_INCREF(value_a);
        *(PyObject **)((char *)obj + offset_a) = value_a;
        Py_INCREF(values[i]);
        *(PyObject **)((char *)obj + offset_b) = values[i];
        if (PyObject_GC_IsTracked(obj)) {
            PyObject_GC_UnTrack(obj);
        }
        PyList_SET_ITEM(out, i, obj);
    }
    Py_DECREF(empty);
    Py_DECREF(seq);
    return out;
}

static PyObject *
track(PyObject *module, PyObject *obj)
{
    if (PyType_IS_GC(Py_TYPE(obj)) && !PyObject_GC_IsTracked(obj)) {
        PyObject_GC_Track(obj);
    }
    Py_RETURN_NONE;
}

static PyMethodDef methods[] = {
    {"slotted", slotted, METH_VARARGS,
     "slotted(cls, n, slot_a, value_a, slot_b, values_b): n untracked instances of cls, slot_a set to value_a, "
     "slot_b to values_b[i]"},
    {"track", track, METH_O, "track(obj): hand obj back to the garbage collector (if it is not tracked)"},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "zdq._untracked", "Objects the garbage collector does not walk (MapFuture).", -1, methods,
};

PyMODINIT_FUNC
PyInit__untracked(void)
{
    return PyModule_Create(&module);
}
